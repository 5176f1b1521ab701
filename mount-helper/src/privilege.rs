//! Who may mount: root with CAP_SYS_ADMIN. velo is never setuid; a non-root path will come
//! through a service that hands out mount fds.

use crate::error::{MountError, Result};

const CAP_SYS_ADMIN: u32 = 21;

/// True if this process can make mounts in its mount namespace.
pub fn can_mount() -> bool {
    rustix::process::geteuid().is_root() && has_effective_cap(CAP_SYS_ADMIN)
}

fn has_effective_cap(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

/// Refuses with a message naming `action` unless this process can mount.
pub fn require_root(action: &str) -> Result<()> {
    if can_mount() {
        Ok(())
    } else {
        Err(MountError::NotRoot {
            action: action.to_owned(),
        })
    }
}
