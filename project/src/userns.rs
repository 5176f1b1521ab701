//! A user's own user and mount namespace: where an ordinary user's `velo` attaches the mounts
//! the service hands it, and runs an install over an empty dir of its own at the real path.
//!
//! The namespace maps only the user's own uid and gid, to themselves, so files keep their
//! owners and the command runs as the user. Root's files show as `nobody` inside it; set-id
//! bits of files whose owner has no mapping are ignored by the kernel, so nothing in the
//! namespace can gain privilege over the host. The capabilities the namespace grants (over
//! it alone) are gone once the command is executed, as it runs with a uid other than 0.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::MoveMountFlags;

/// What stops an ordinary user from making namespaces.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsernsError(pub String);

/// The sysctls that decide whether unprivileged user namespaces are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sysctls {
    /// `kernel.unprivileged_userns_clone` (Debian's and Ubuntu's kernels).
    pub unprivileged_userns_clone: Option<String>,
    /// `user.max_user_namespaces`.
    pub max_user_namespaces: Option<String>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10+).
    pub apparmor_restrict: Option<String>,
}

impl Sysctls {
    /// The values on this machine (missing files are `None`).
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
        Self {
            unprivileged_userns_clone: read("/proc/sys/kernel/unprivileged_userns_clone"),
            max_user_namespaces: read("/proc/sys/user/max_user_namespaces"),
            apparmor_restrict: read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        }
    }

    /// One sentence naming the setting that forbids unprivileged user namespaces, if one does.
    pub fn blocker(&self) -> Option<String> {
        if self.unprivileged_userns_clone.as_deref() == Some("0") {
            return Some(
                "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0); \
                 enable them with `sudo sysctl -w kernel.unprivileged_userns_clone=1`, or use \
                 `sudo velo run`"
                    .into(),
            );
        }
        if self.max_user_namespaces.as_deref() == Some("0") {
            return Some(
                "user namespaces are disabled (user.max_user_namespaces=0); allow them with \
                 `sudo sysctl -w user.max_user_namespaces=15000`, or use `sudo velo run`"
                    .into(),
            );
        }
        if self.apparmor_restrict.as_deref() == Some("1") {
            return Some(
                "AppArmor restricts unprivileged user namespaces \
                 (kernel.apparmor_restrict_unprivileged_userns=1); allow them with `sudo sysctl \
                 -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile for \
                 velo with `userns,`, or use `sudo velo run`"
                    .into(),
            );
        }
        None
    }
}

/// Why `unshare(CLONE_NEWUSER)` failed with `errno`, in one sentence with the setting to
/// change.
pub fn explain(errno: Errno, sysctls: &Sysctls) -> String {
    if let Some(b) = sysctls.blocker() {
        return format!("velo cannot make a user namespace: {b}");
    }
    match errno {
        Errno::NOSPC => "velo cannot make a user namespace: the limit \
                         (user.max_user_namespaces) is reached in this namespace; raise it with \
                         `sudo sysctl -w user.max_user_namespaces=15000`, or use `sudo velo run`"
            .into(),
        Errno::INVAL => "velo cannot make a user namespace: it was started with threads \
                         running (a bug in velo; please report it)"
            .into(),
        e => format!(
            "velo cannot make a user namespace ({e}): a security module or a container \
             runtime (seccomp) forbids it here; allow unprivileged user namespaces, or use \
             `sudo velo run`"
        ),
    }
}

/// Moves this process into a new user namespace (mapping its own uid and gid to themselves)
/// and a new mount namespace, whose mounts are made slaves so nothing propagates back to the
/// host. The process must be single-threaded.
pub fn enter() -> Result<(), UsernsError> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    // SAFETY: the caller is single-threaded (unshare(CLONE_NEWUSER) refuses otherwise); no
    // file descriptor table is unshared.
    unsafe {
        rustix::thread::unshare_unsafe(
            rustix::thread::UnshareFlags::NEWUSER | rustix::thread::UnshareFlags::NEWNS,
        )
    }
    .map_err(|e| UsernsError(explain(e, &Sysctls::read())))?;
    let write = |file: &str, text: String| {
        std::fs::write(file, text)
            .map_err(|e| UsernsError(format!("set up the user namespace: write {file}: {e}")))
    };
    // setgroups must be denied before an unprivileged process may write its gid_map.
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::REC
            | rustix::mount::MountPropagationFlags::DOWNSTREAM,
    )
    .map_err(|e| UsernsError(format!("make the copied mounts slaves: {e}")))
}

/// Attaches the detached mount `mount` at `target`, a directory (not a symlink).
pub fn attach(mount: BorrowedFd<'_>, target: &Path) -> std::io::Result<()> {
    let dir = rustix::fs::open(
        target,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::mount::move_mount(
        mount,
        "",
        dir.as_fd(),
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(())
}

/// Bind-mounts the directory `source` over `target` (both the caller's own).
pub fn bind(source: &Path, target: &Path) -> std::io::Result<()> {
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        source,
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
            | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?;
    attach(tree.as_fd(), target)
}

/// Mounts a new, empty tmpfs at `target` (a directory, not a symlink) holding at most `size`
/// bytes, its root owned by the caller with permission bits `mode`.
pub fn tmpfs(target: &Path, size: u64, mode: u32) -> std::io::Result<()> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsconfig_set_string, fsmount,
        fsopen,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(fs.as_fd(), "size", size.to_string())?;
    fsconfig_set_string(fs.as_fd(), "mode", format!("{:o}", mode & 0o7777))?;
    fsconfig_create(fs.as_fd())?;
    let mount = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )?;
    attach(mount.as_fd(), target)
}

/// Detaches whatever is mounted at `target` (lazily: busy files keep it until closed).
pub fn detach(target: &Path) {
    let _ = rustix::mount::unmount(
        target,
        rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_blocking_setting_is_named_with_how_to_change_it() {
        let debian = Sysctls {
            unprivileged_userns_clone: Some("0".into()),
            ..Default::default()
        };
        assert!(explain(Errno::PERM, &debian).contains("kernel.unprivileged_userns_clone=1"));
        let none = Sysctls {
            max_user_namespaces: Some("0".into()),
            ..Default::default()
        };
        assert!(explain(Errno::NOSPC, &none).contains("user.max_user_namespaces"));
        let ubuntu = Sysctls {
            apparmor_restrict: Some("1".into()),
            ..Default::default()
        };
        assert!(explain(Errno::PERM, &ubuntu).contains("apparmor_restrict_unprivileged_userns"));
        let open = Sysctls {
            unprivileged_userns_clone: Some("1".into()),
            max_user_namespaces: Some("100".into()),
            apparmor_restrict: Some("0".into()),
        };
        assert_eq!(open.blocker(), None);
        assert!(explain(Errno::NOSPC, &open).contains("limit"));
        assert!(explain(Errno::PERM, &open).contains("sudo velo run"));
    }
}
