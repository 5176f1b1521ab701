//! The service's listening socket: handed over by systemd (socket activation, `LISTEN_FDS`),
//! or bound at a path, mode 0666 — every local user may connect, because the service decides
//! everything by the caller's credentials.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::error::{MountError, Result};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The socket the service accepts connections on.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    path: PathBuf,
    /// True if systemd made it (and removes it): the service leaves the path alone.
    activated: bool,
}

impl Listener {
    /// The listening socket.
    pub fn socket(&self) -> &UnixListener {
        &self.socket
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if it came from systemd (socket activation).
    pub fn activated(&self) -> bool {
        self.activated
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if !self.activated {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How many sockets systemd passed to this process, from `LISTEN_PID` and `LISTEN_FDS`.
pub fn passed_fds(listen_pid: Option<&str>, listen_fds: Option<&str>, me: u32) -> usize {
    match (listen_pid.and_then(|p| p.parse::<u32>().ok()), listen_fds) {
        (Some(pid), Some(n)) if pid == me => n.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The socket systemd passed, if any; otherwise one bound at `path` (its directory created
/// 0755 if missing; a stale socket file there is replaced, a live one is an error).
pub fn listen(path: &Path) -> Result<Listener> {
    let passed = passed_fds(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    );
    // Not for the commands the service might start: unset them.
    // SAFETY: single-threaded at this point (the service starts its threads later).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if passed >= 1 {
        // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours); nothing else in
        // this process has taken ownership of it.
        let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
        let listening = rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false);
        let is_unix = rustix::net::getsockname(&fd)
            .is_ok_and(|a| a.address_family() == rustix::net::AddressFamily::UNIX);
        if !(listening && is_unix) {
            return Err(MountError::Io {
                op: "use the socket passed by systemd (LISTEN_FDS)",
                path: path.to_owned(),
                cause: std::io::Error::other("fd 3 is not a listening unix stream socket"),
            });
        }
        // The path systemd bound (for messages), where the socket says.
        let bound = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| {
                rustix::net::SocketAddrUnix::try_from(a)
                    .ok()?
                    .path()
                    .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p.to_bytes())))
            })
            .unwrap_or_else(|| path.to_owned());
        return Ok(Listener {
            socket: UnixListener::from(fd),
            path: bound,
            activated: true,
        });
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| MountError::io("create", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| MountError::io("chmod", dir, e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(MountError::Io {
                    op: "listen at",
                    path: path.to_owned(),
                    cause: std::io::Error::other("a service already listens there (stop it first)"),
                });
            }
            std::fs::remove_file(path).map_err(|e| MountError::io("remove stale", path, e))?;
        }
        Ok(_) => {
            return Err(MountError::Io {
                op: "listen at",
                path: path.to_owned(),
                cause: std::io::Error::other("something that is not a socket is there"),
            });
        }
        Err(_) => {}
    }
    let socket = UnixListener::bind(path).map_err(|e| MountError::io("listen at", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| MountError::io("chmod", path, e))?;
    Ok(Listener {
        socket,
        path: path.to_owned(),
        activated: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_count_only_for_this_process() {
        assert_eq!(passed_fds(Some("42"), Some("1"), 42), 1);
        assert_eq!(passed_fds(Some("41"), Some("1"), 42), 0);
        assert_eq!(passed_fds(None, Some("1"), 42), 0);
        assert_eq!(passed_fds(Some("x"), Some("1"), 42), 0);
        assert_eq!(passed_fds(Some("42"), Some("y"), 42), 0);
    }
}
