//! The protocol between `velo` (any user) and `velo-mountd` (root), over a unix stream socket.
//!
//! A conversation is a sequence of messages. Each message is one JSON object followed by a NUL
//! byte (the framing varlink and systemd-mountfsd use), at most [`MAX_MESSAGE`] bytes. Two
//! messages are followed by raw bytes whose length the message states:
//!
//! ```text
//! client                                    service
//! {"import":{"name":…,"image":D,"size":N,"profile":P}}\0
//! N bytes: the EROFS image (velo's writer)
//! P bytes: the image's access profile            ("profile" only if the service said
//!                                                 "profiles" at hello)
//!                                           {"need":{"count":K}}\0
//!                                           K × 32 bytes: the digests of the objects to send
//! each needed object's bytes, in that order
//! (their sizes are the image's)
//!                                           {"imported":{…}}\0
//!
//! {"mount":{"name":…,"writes":"discard"}}\0
//!                                           {"mounted":{…}}\0 + a detached mount fd (SCM_RIGHTS)
//! … more mounts on the same connection …
//! {"done":null}\0   (or the connection closes: the service takes the mounts back either way)
//! ```
//!
//! Every other request gets exactly one response. Errors are `{"error":{"kind":…,"message":…}}`.
//! Parsing is in pure functions ([`parse_request`], [`parse_response`]) that both sides share
//! and that are property-tested and fuzzed: the service treats every byte a client sends as
//! hostile. The service reads with plain `read(2)`, so file descriptors a client attaches are
//! discarded by the kernel; only the client receives fds.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use velo_objects::{Digest, validate_ref_name};

/// The protocol's version; a service refuses clients of another.
pub const VERSION: u32 = 1;
/// The largest message (JSON and its NUL) either side accepts.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Where `velo-mountd` listens unless told otherwise (`--socket`, `VELO_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/velo/velo.sock";
/// The longest persist id a client may send.
pub const MAX_PERSIST_ID: usize = 64;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Opens a conversation: the client's protocol version. Answered by [`Response::Hello`].
    Hello {
        /// [`VERSION`] of the client.
        version: u32,
        /// Also report what the caller's refs hold against their quota (reads every ref:
        /// not on a run's path).
        #[serde(default)]
        usage: bool,
    },
    /// Which image a ref names, for the caller (their own refs first, then published ones).
    Resolve {
        /// The ref, as the caller names it.
        name: String,
        /// Also count the image's files and bytes (reads the image).
        #[serde(default)]
        summary: bool,
        /// Also report the bytes kept by this persisted upper (see [`Writes::Persist`]).
        #[serde(default)]
        persist: Option<String>,
    },
    /// Takes a tree in: an image of `size` bytes whose fs-verity digest is `image` follows,
    /// then the objects the service asks for. The ref, if named, is written in the caller's
    /// namespace.
    Import {
        /// The ref to point at the stored image (in the caller's namespace).
        name: Option<String>,
        /// The fs-verity digest of the image bytes that follow.
        image: Digest,
        /// Their length.
        size: u64,
        /// Bytes of the image's access profile that follow the image (the service said
        /// `profiles` at hello). Hostile input like the rest: a bad profile is dropped, never
        /// failing the import.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<u64>,
    },
    /// A detached mount of the image a ref names, answered with [`Response::Mounted`] and the
    /// mount's fd.
    Mount {
        /// The ref, as the caller names it.
        name: String,
        /// What happens to writes.
        writes: Writes,
    },
    /// The mounts of this connection are no longer attached anywhere (the command exited).
    Done,
    /// The refs the caller may read.
    Refs,
    /// The image a ref the caller may read names, and all its objects: answered with
    /// [`Response::Exporting`], then the image's bytes, then (if asked for and there is one)
    /// its access profile's bytes, then for each object (in path order) its digest (32
    /// bytes), its size (u64, little-endian) and its bytes.
    Export {
        /// The ref, as the caller names it.
        name: String,
        /// Also send the image's access profile (the service said `profiles` at hello).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        profile: bool,
    },
    /// Removes one of the caller's own refs.
    RemoveRef {
        /// The ref, as the caller names it.
        name: String,
    },
    /// What the service holds (images, overlays lent and idle).
    Status,
    /// Stops the service (root only); answered once it has let everything go.
    Stop,
}

/// What happens to writes under a mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Writes {
    /// None: the mount is read-only.
    ReadOnly,
    /// Copy-on-write into a fresh upper dir, owned by the caller and dropped when the mount
    /// is given back.
    Discard,
    /// Copy-on-write into an upper dir kept in the store for the caller under this id (one
    /// per user, project, dir and key); never mounted twice at once.
    Persist(String),
}

/// What the service answers. Unlike requests, answers may carry fields this client does not
/// know (a newer service adds some): they are ignored, so a client keeps working across an
/// upgrade of the service that keeps [`VERSION`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// The answer to [`Request::Hello`].
    Hello {
        /// The service's [`VERSION`].
        version: u32,
        /// The caller as the service sees it (`SO_PEERCRED`).
        uid: u32,
        /// Its group.
        gid: u32,
        /// The store the service owns (for messages; clients never open it).
        store: String,
        /// "require" if the kernel checks every object's fs-verity digest, "off" if not.
        verity: String,
        /// The caller's quota on new bytes, if one is set.
        quota: Option<u64>,
        /// What the caller's refs hold against it now (if asked).
        #[serde(default)]
        used: Option<u64>,
        /// The service takes access profiles with imports and sends them with exports
        /// (absent from a service older than that: clients then send and ask for none).
        #[serde(default)]
        profiles: bool,
    },
    /// The answer to [`Request::Resolve`].
    Resolved {
        /// The image, or none if the ref does not exist for the caller.
        image: Option<Digest>,
        /// True if the ref is a published one (not the caller's own).
        #[serde(default)]
        published: bool,
        /// Regular files in the image (if asked).
        #[serde(default)]
        files: Option<u64>,
        /// Their bytes (if asked).
        #[serde(default)]
        bytes: Option<u64>,
        /// Bytes kept by the persisted upper (if asked and it exists).
        #[serde(default)]
        persisted_bytes: Option<u64>,
        /// When the ref was last mounted or written (seconds since the epoch), for the
        /// caller's own refs.
        #[serde(default)]
        last_used: Option<u64>,
    },
    /// An export follows: the image's `size` bytes, then `objects` objects.
    Exporting {
        /// The image.
        image: Digest,
        /// Its length.
        size: u64,
        /// How many objects follow it.
        objects: u64,
        /// Bytes of the image's access profile between the image and the objects (0: none).
        #[serde(default)]
        profile: u64,
    },
    /// The objects the service needs: `count` × 32 bytes of digests follow.
    Need {
        /// How many.
        count: u64,
    },
    /// An import is done.
    Imported(ImportSummary),
    /// A mount's fd comes with this message.
    Mounted {
        /// The image mounted.
        image: Digest,
        /// True if writes go to an upper dir.
        writable: bool,
        /// "require" or "off" (see [`Response::Hello`]).
        verity: String,
        /// True if the upper dir is kept across runs.
        persisted: bool,
        /// True if this overlay served an earlier run (its dentries are warm).
        reused: bool,
    },
    /// The answer to [`Request::Refs`].
    Refs {
        /// The refs.
        refs: Vec<RefEntry>,
    },
    /// What the service holds.
    Status {
        /// One entry per image it keeps mounted.
        images: Vec<CachedImage>,
    },
    /// Done (for requests with nothing else to say).
    Ok,
    /// The request failed; nothing was changed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What failed and why, in words.
        message: String,
    },
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSummary {
    /// The image stored: velo's writer's output for the tree as the service mapped it.
    pub image: Digest,
    /// The ref written, as the caller names it.
    pub name: Option<String>,
    /// Objects the image needs.
    pub objects: u64,
    /// Objects the client sent.
    pub objects_sent: u64,
    /// Bytes this import added to the store (charged to the caller's quota).
    pub new_bytes: u64,
    /// Inodes whose owner was changed to the caller.
    pub owners_mapped: u64,
    /// Set-id bits removed.
    pub setid_cleared: u64,
    /// Device nodes removed.
    pub devices_removed: u64,
    /// Extended attributes removed.
    pub xattrs_removed: u64,
    /// What became of the access profile sent with the image.
    #[serde(default = "no_profile")]
    pub profile: velo_objects::ProfileOutcome,
}

fn no_profile() -> velo_objects::ProfileOutcome {
    velo_objects::ProfileOutcome::None
}

/// One ref the caller may read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEntry {
    /// The name, as the caller names it.
    pub name: String,
    /// The image.
    pub image: Digest,
    /// True if root published it (not the caller's own).
    pub published: bool,
}

/// One image the service keeps mounted, as `velo service status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedImage {
    /// The image.
    pub image: Digest,
    /// Mount requests it answered from the superblock it already had.
    pub hits: u64,
    /// Overlays of it lent out now.
    pub lent: usize,
    /// Overlays of it waiting, pristine, for the next run.
    pub idle: usize,
    /// Overlays of it handed back and being checked now.
    pub checking: usize,
    /// Overlays discarded while something still reaches them (removed once nothing does).
    pub retired: usize,
    /// Runs that got an overlay an earlier run had handed back untouched.
    pub reused: u64,
    /// Handed-back overlays that were discarded (written to, or still reachable).
    pub discarded: u64,
}

/// Kinds of failure, for clients to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request was malformed or out of order.
    BadRequest,
    /// The caller may not do this.
    Denied,
    /// No such ref (for this caller).
    NotFound,
    /// The caller's quota would be exceeded.
    Quota,
    /// Bytes that arrived are not what they claim to be.
    Corrupt,
    /// Too many connections or imports at once, or the upper dir is in use.
    Busy,
    /// Something failed in the service (the message says what).
    Failed,
}

/// A message that could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON of a known message, or a field out of bounds.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Longer than [`MAX_MESSAGE`].
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    /// The peer closed the connection (before a whole message, if `partial`).
    #[error("the connection closed{}", if *.partial { " in the middle of a message" } else { "" })]
    Closed {
        /// Some bytes of a message had arrived.
        partial: bool,
    },
    /// Reading or writing failed (a timeout, a reset).
    #[error("{0}")]
    Io(String),
}

/// Parses one request (the bytes between two NULs) and checks every field a client controls:
/// ref names are valid ref names, persist ids are short and plain, sizes are bounded.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ProtocolError> {
    if bytes.len() >= MAX_MESSAGE {
        return Err(ProtocolError::TooLong);
    }
    let req: Request =
        serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let name_ok =
        |n: &str| validate_ref_name(n).map_err(|e| ProtocolError::Malformed(e.to_string()));
    match &req {
        Request::Resolve { name, persist, .. } => {
            name_ok(name)?;
            if let Some(p) = persist {
                check_persist_id(p)?;
            }
        }
        Request::Import { name, size, .. } => {
            if let Some(n) = name {
                name_ok(n)?;
            }
            if *size > velo_image::inspect::MAX_IMAGE_BYTES {
                return Err(ProtocolError::Malformed(format!(
                    "an image of {size} bytes (at most {} are accepted)",
                    velo_image::inspect::MAX_IMAGE_BYTES
                )));
            }
        }
        Request::Mount { name, writes } => {
            name_ok(name)?;
            if let Writes::Persist(id) = writes {
                check_persist_id(id)?;
            }
        }
        Request::RemoveRef { name } | Request::Export { name, .. } => name_ok(name)?,
        Request::Hello { .. } | Request::Done | Request::Refs | Request::Status | Request::Stop => {
        }
    }
    Ok(req)
}

/// A persist id: 1–[`MAX_PERSIST_ID`] of `[a-z0-9-]`.
pub fn check_persist_id(id: &str) -> Result<(), ProtocolError> {
    if id.is_empty()
        || id.len() > MAX_PERSIST_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ProtocolError::Malformed(format!(
            "persist id {id:?}: 1-{MAX_PERSIST_ID} of a-z, 0-9 and -"
        )));
    }
    Ok(())
}

/// Parses one response.
pub fn parse_response(bytes: &[u8]) -> Result<Response, ProtocolError> {
    if bytes.len() >= MAX_MESSAGE {
        return Err(ProtocolError::TooLong);
    }
    serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// One message on the wire: its JSON and the NUL after it.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain types cannot fail (no maps with non-string keys, no I/O).
    let mut out = serde_json::to_vec(message).unwrap_or_else(|_| b"null".to_vec());
    out.push(0);
    out
}

/// Splits the first message off `buf`: `Some((message, rest))` once a NUL has arrived.
pub fn split_message(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

/// One end of a conversation: messages and raw bytes, buffered, with the fds that arrived
/// (only where [`Conn::receiving_fds`] was asked for).
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    start: usize,
    fds: VecDeque<OwnedFd>,
    receive_fds: bool,
}

impl Conn {
    /// A connection that never takes fds from its peer (the service's side).
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            start: 0,
            fds: VecDeque::new(),
            receive_fds: false,
        }
    }

    /// A connection that keeps the fds its peer sends (the client's side).
    pub fn receiving_fds(stream: UnixStream) -> Self {
        Self {
            receive_fds: true,
            ..Self::new(stream)
        }
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads more bytes into the buffer; returns how many (0 at the end of the stream).
    fn fill(&mut self) -> Result<usize, ProtocolError> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + (64 << 10), 0);
        let got = if self.receive_fds {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let r = rustix::net::recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut self.buf[old..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            if let Ok(msg) = &r {
                let _ = msg;
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = m {
                        self.fds.extend(fds);
                    }
                }
            }
            r.map(|m| m.bytes)
        } else {
            rustix::io::read(&self.stream, &mut self.buf[old..])
        };
        match got {
            Ok(n) => {
                self.buf.truncate(old + n);
                Ok(n)
            }
            Err(e) => {
                self.buf.truncate(old);
                Err(match e {
                    rustix::io::Errno::AGAIN => {
                        ProtocolError::Io("timed out waiting for the peer".into())
                    }
                    e => ProtocolError::Io(e.to_string()),
                })
            }
        }
    }

    /// The next message's bytes (without its NUL).
    pub fn read_message(&mut self) -> Result<Vec<u8>, ProtocolError> {
        loop {
            if let Some((msg, _)) = split_message(self.buffered()) {
                let msg = msg.to_vec();
                self.start += msg.len() + 1;
                return Ok(msg);
            }
            if self.buffered().len() >= MAX_MESSAGE {
                return Err(ProtocolError::TooLong);
            }
            if self.fill()? == 0 {
                return Err(ProtocolError::Closed {
                    partial: !self.buffered().is_empty(),
                });
            }
        }
    }

    /// The next request.
    pub fn read_request(&mut self) -> Result<Request, ProtocolError> {
        parse_request(&self.read_message()?)
    }

    /// The next response.
    pub fn read_response(&mut self) -> Result<Response, ProtocolError> {
        parse_response(&self.read_message()?)
    }

    /// Reads raw bytes into `out`, exactly `out.len()` of them.
    pub fn read_exact(&mut self, out: &mut [u8]) -> Result<(), ProtocolError> {
        let mut done = 0;
        while done < out.len() {
            if self.buffered().is_empty() && self.fill()? == 0 {
                return Err(ProtocolError::Closed { partial: true });
            }
            let have = self.buffered();
            let n = have.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&have[..n]);
            self.start += n;
            done += n;
        }
        Ok(())
    }

    /// A reader of the next `len` raw bytes (for streaming an object into the store).
    pub fn raw(&mut self, len: u64) -> RawReader<'_> {
        RawReader {
            conn: self,
            left: len,
        }
    }

    /// The oldest fd that arrived and was not taken yet.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Sends a message.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), ProtocolError> {
        (&self.stream)
            .write_all(&encode(message))
            .map_err(|e| ProtocolError::Io(e.to_string()))
    }

    /// Sends a message with a file descriptor attached.
    pub fn send_with_fd<T: Serialize>(
        &self,
        message: &T,
        fd: BorrowedFd<'_>,
    ) -> Result<(), ProtocolError> {
        let bytes = encode(message);
        let fds = [fd];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            &self.stream,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| ProtocolError::Io(e.to_string()))?;
        // The fd went with the first byte; the rest of a long message follows plainly.
        (&self.stream)
            .write_all(&bytes[sent..])
            .map_err(|e| ProtocolError::Io(e.to_string()))
    }

    /// Sends raw bytes.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ProtocolError> {
        (&self.stream)
            .write_all(bytes)
            .map_err(|e| ProtocolError::Io(e.to_string()))
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Raw bytes of a known length, read from a [`Conn`].
#[derive(Debug)]
pub struct RawReader<'c> {
    conn: &'c mut Conn,
    left: u64,
}

impl std::io::Read for RawReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || out.is_empty() {
            return Ok(0);
        }
        if self.conn.buffered().is_empty() && self.conn.fill().map_err(std::io::Error::other)? == 0
        {
            return Ok(0);
        }
        let have = self.conn.buffered();
        let n = have.len().min(out.len()).min(self.left as usize);
        out[..n].copy_from_slice(&have[..n]);
        self.conn.start += n;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest(b: u8) -> Digest {
        Digest::from_bytes([b; 32])
    }

    /// Every request a client may send survives encoding and parsing unchanged.
    #[test]
    fn requests_round_trip() {
        let all = [
            Request::Hello {
                version: VERSION,
                usage: true,
            },
            Request::Resolve {
                name: "deps/npm/abc".into(),
                summary: true,
                persist: Some("p-1".into()),
            },
            Request::Import {
                name: Some("deps/x".into()),
                image: digest(1),
                size: 4096,
                profile: None,
            },
            Request::Import {
                name: None,
                image: digest(1),
                size: 4096,
                profile: Some(77),
            },
            Request::Mount {
                name: "a/b".into(),
                writes: Writes::Persist("x".into()),
            },
            Request::Mount {
                name: "a".into(),
                writes: Writes::Discard,
            },
            Request::Done,
            Request::Refs,
            Request::RemoveRef { name: "a".into() },
            Request::Export {
                name: "a/b".into(),
                profile: false,
            },
            Request::Export {
                name: "a/b".into(),
                profile: true,
            },
            Request::Status,
            Request::Stop,
        ];
        for r in all {
            let wire = encode(&r);
            let (msg, rest) = split_message(&wire).expect("a NUL");
            assert!(rest.is_empty());
            assert_eq!(parse_request(msg).expect("parses"), r);
        }
    }

    /// What a client controls is checked while parsing: ref names, persist ids, image sizes,
    /// unknown fields and verbs.
    #[test]
    fn hostile_fields_are_refused() {
        let bad: &[&str] = &[
            r#"{"resolve":{"name":"../../etc/passwd"}}"#,
            r#"{"resolve":{"name":"/abs"}}"#,
            r#"{"mount":{"name":"a","writes":{"persist":"../x"}}}"#,
            r#"{"mount":{"name":"a","writes":{"persist":""}}}"#,
            r#"{"mount":{"name":"a","writes":"discard","target":"/etc"}}"#,
            r#"{"import":{"name":null,"image":"00","size":1}}"#,
            r#"{"import":{"name":"a","image":"0000000000000000000000000000000000000000000000000000000000000000","size":99999999999999}}"#,
            r#"{"unmount":{"path":"/"}}"#,
            r#"{"hello":{"version":"1"}}"#,
            r#"[1,2,3]"#,
            "",
            "\u{0}",
        ];
        for b in bad {
            assert!(
                matches!(
                    parse_request(b.as_bytes()),
                    Err(ProtocolError::Malformed(_))
                ),
                "{b} was taken"
            );
        }
        let long = vec![b' '; MAX_MESSAGE];
        assert_eq!(parse_request(&long), Err(ProtocolError::TooLong));
    }

    /// A newer service's answers may carry fields this client does not know: they are
    /// ignored (a request with an unknown field, from a client, is refused instead).
    #[test]
    fn answers_with_new_fields_still_parse() {
        let newer = br#"{"resolved":{"image":null,"published":false,"added-later":7}}"#;
        assert!(matches!(
            parse_response(newer),
            Ok(Response::Resolved { image: None, .. })
        ));
        let newer = br#"{"mounted":{"image":"0000000000000000000000000000000000000000000000000000000000000000","writable":true,"verity":"off","persisted":false,"reused":false,"epoch":3}}"#;
        assert!(parse_response(newer).is_ok());
    }

    /// Profiles travel only between a client and a service that both know them: what a
    /// client sends without one is what an older client sent, and an older service's hello
    /// (without `profiles`) tells a newer client to send and ask for none.
    #[test]
    fn profiles_are_an_extension_older_peers_do_not_see() {
        let plain = Request::Import {
            name: None,
            image: digest(1),
            size: 9,
            profile: None,
        };
        let wire = String::from_utf8(encode(&plain)).expect("utf-8");
        assert!(!wire.contains("profile"), "{wire}");
        let export = Request::Export {
            name: "a".into(),
            profile: false,
        };
        assert_eq!(encode(&export), b"{\"export\":{\"name\":\"a\"}}\0");
        let older =
            br#"{"hello":{"version":1,"uid":5,"gid":5,"store":"/s","verity":"off","quota":null}}"#;
        assert!(matches!(
            parse_response(older),
            Ok(Response::Hello {
                profiles: false,
                ..
            })
        ));
        let older = br#"{"exporting":{"image":"0000000000000000000000000000000000000000000000000000000000000000","size":1,"objects":0}}"#;
        assert!(matches!(
            parse_response(older),
            Ok(Response::Exporting { profile: 0, .. })
        ));
    }

    /// A conversation over a real socket pair: messages, raw bytes between them, and an fd.
    #[test]
    fn conn_carries_messages_raw_bytes_and_fds() {
        let (a, b) = UnixStream::pair().expect("pair");
        let client = Conn::receiving_fds(a);
        let mut service = Conn::new(b);
        client
            .send(&Request::Import {
                name: None,
                image: digest(2),
                size: 3,
                profile: None,
            })
            .expect("send");
        client.send_raw(b"xyz").expect("raw");
        client.send(&Request::Done).expect("send");
        assert!(matches!(
            service.read_request(),
            Ok(Request::Import { size: 3, .. })
        ));
        let mut raw = [0u8; 3];
        service.read_exact(&mut raw).expect("raw");
        assert_eq!(&raw, b"xyz");
        assert_eq!(service.read_request(), Ok(Request::Done));

        let file = tempfile::tempfile().expect("tempfile");
        service
            .send_with_fd(&Response::Ok, file.as_fd())
            .expect("send fd");
        let mut client = client;
        assert_eq!(client.read_response(), Ok(Response::Ok));
        assert!(client.take_fd().is_some(), "the fd arrived");
        drop(service);
        assert_eq!(
            client.read_response(),
            Err(ProtocolError::Closed { partial: false })
        );
    }

    /// The service's side drops fds a client sends instead of keeping them.
    #[test]
    fn the_service_side_keeps_no_fds() {
        let (a, b) = UnixStream::pair().expect("pair");
        let client = Conn::new(a);
        let mut service = Conn::new(b);
        let file = tempfile::tempfile().expect("tempfile");
        client
            .send_with_fd(&Request::Refs, file.as_fd())
            .expect("send");
        assert_eq!(service.read_request(), Ok(Request::Refs));
        assert!(service.take_fd().is_none());
    }

    /// A message that never ends is cut off at the limit, not buffered without bound.
    #[test]
    fn an_endless_message_is_refused_at_the_limit() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut service = Conn::new(b);
        let writer = std::thread::spawn(move || {
            let junk = vec![b'x'; 4096];
            let mut sent = 0;
            while sent < 2 * MAX_MESSAGE {
                if (&a).write_all(&junk).is_err() {
                    break;
                }
                sent += junk.len();
            }
        });
        assert_eq!(service.read_message(), Err(ProtocolError::TooLong));
        drop(service);
        let _ = writer.join();
    }

    proptest! {
        /// Any bytes at all: the parser answers (never panics), and what it takes is a request
        /// whose names are valid.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(req) = parse_request(&bytes) {
                let again = parse_request(&encode(&req)[..encode(&req).len() - 1]);
                prop_assert_eq!(again, Ok(req));
            }
        }

        /// Messages split at any points arrive whole and in order.
        #[test]
        fn split_points_do_not_matter(
            names in proptest::collection::vec("[a-z]{1,8}(/[a-z0-9]{1,8}){0,3}", 1..6),
            cut in 1usize..64,
        ) {
            let reqs: Vec<Request> = names
                .iter()
                .map(|n| Request::Resolve { name: n.clone(), summary: false, persist: None })
                .collect();
            let wire: Vec<u8> = reqs.iter().flat_map(encode).collect();
            let (a, b) = UnixStream::pair().expect("pair");
            let mut service = Conn::new(b);
            // From a thread of its own: many tiny writes fill the socket's buffer (each costs
            // a whole buffer's overhead) long before their bytes do.
            let writer = std::thread::spawn(move || {
                for chunk in wire.chunks(cut) {
                    (&a).write_all(chunk).expect("write");
                }
            });
            for r in &reqs {
                prop_assert_eq!(&service.read_request().expect("request"), r);
            }
            writer.join().expect("the writer");
            prop_assert_eq!(service.read_request(), Err(ProtocolError::Closed { partial: false }));
        }
    }
}
