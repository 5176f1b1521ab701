//! `velo doctor`: privileges, kernel features and the store, in plain words.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;
use velo_objects::{Store, StoreError, VerityMode};

use super::Ctx;
use crate::output;

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
    }
}

pub fn doctor(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let mut checks = Vec::new();
    let root = velo_mount::privilege::can_mount();
    checks.push(if root {
        check(
            "privileges",
            Status::Ok,
            "running as root with CAP_SYS_ADMIN: mounting works",
        )
    } else {
        check(
            "privileges",
            Status::Warn,
            "not root: velo run, snapshot, status and ls go through velo-mountd; mount/umount on the host need root",
        )
    });
    service_checks(ctx, root, &mut checks);
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    checks.push(check("kernel", Status::Ok, format!("Linux {release}")));
    for fs in ["erofs", "overlay"] {
        checks.push(match velo_mount::kernel::FsContext::open(fs) {
            Ok(_) => check(fs, Status::Ok, format!("{fs} filesystem available")),
            Err(e) if root => check(fs, Status::Fail, e.to_string()),
            Err(_) => check(
                fs,
                if filesystem_listed(fs) {
                    Status::Ok
                } else {
                    Status::Fail
                },
                format!(
                    "{fs} {} /proc/filesystems (root needed to probe further)",
                    if filesystem_listed(fs) {
                        "listed in"
                    } else {
                        "missing from"
                    }
                ),
            ),
        });
    }
    checks.push(if root {
        match probe_mount_stack(&ctx.store) {
            Ok(p) => check(
                "mount stack",
                Status::Ok,
                format!(
                    "EROFS + overlayfs with a data-only lower layer work (layers passed as {}; image read {})",
                    match p.layers {
                        velo_mount::LayerPassing::Fds => "fds",
                        velo_mount::LayerPassing::Paths => "paths",
                        velo_mount::LayerPassing::AttachedPaths => "paths to a briefly attached image (older kernel)",
                    },
                    match p.image_backing {
                        velo_mount::ImageBacking::FileDirectIo => "file-backed with direct I/O",
                        velo_mount::ImageBacking::File => "file-backed, cached (no direct I/O here)",
                        velo_mount::ImageBacking::Loop => "through a loop device (this filesystem cannot back EROFS directly)",
                    }
                ),
            ),
            Err(e) => check("mount stack", Status::Fail, format!("{e:#}")),
        }
    } else {
        check("mount stack", Status::Warn, "not probed (needs root)")
    });

    match Store::open(&ctx.store) {
        _ if ctx.through_service() => {} // the service owns the store; users never open it
        Ok(store) => store_checks(&store, &mut checks),
        Err(StoreError::NoStore { path }) => {
            let dir = existing_ancestor(&path);
            checks.push(check(
                "store",
                Status::Ok,
                format!(
                    "no store at {} yet; the first `velo snapshot` creates it",
                    path.display()
                ),
            ));
            checks.push(verity_check(&dir, None));
            checks.push(space_check(&dir));
        }
        Err(e @ StoreError::UntrustedStore { .. }) => {
            checks.push(check("store owner", Status::Fail, e.to_string()))
        }
        Err(e) => checks.push(check("store", Status::Fail, e.to_string())),
    }

    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if ctx.json {
        output::json(&serde_json::json!({ "ok": !failed, "checks": checks }))?;
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            outln!("[{tag}] {:<12} {}", c.name, c.detail);
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// velo-mountd (for ordinary users, and root's warm runs) and user namespaces (where an
/// ordinary user's velo attaches its mounts).
fn service_checks(ctx: &Ctx, root: bool, checks: &mut Vec<Check>) {
    let socket = velo_project::client::socket_path(ctx.socket.as_deref());
    checks.push(
        match velo_project::client::Client::connect_with_usage(&socket) {
            Ok(client) => {
                let h = client.hello().clone();
                client.done();
                check(
                    "velo-mountd",
                    Status::Ok,
                    format!(
                        "answers at {} (store {}, verity {}); you are uid {}{}",
                        socket.display(),
                        h.store.display(),
                        h.verity,
                        h.uid,
                        h.quota
                            .map(|q| format!(
                                ", your refs hold {} of {}",
                                output::bytes(h.used.unwrap_or(0)),
                                output::bytes(q)
                            ))
                            .unwrap_or_default()
                    ),
                )
            }
            Err(e) => check(
                "velo-mountd",
                if root { Status::Warn } else { Status::Fail },
                if root {
                    format!("not running ({e}); root's velo works on the store directly")
                } else {
                    e.to_string()
                },
            ),
        },
    );
    if !root {
        let sysctls = velo_project::userns::Sysctls::read();
        checks.push(match sysctls.blocker() {
            Some(why) => check("user namespaces", Status::Fail, why),
            None => check(
                "user namespaces",
                Status::Ok,
                "unprivileged user namespaces are allowed: velo run attaches its mounts in one of its own",
            ),
        });
    }
}

fn filesystem_listed(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().last() == Some(fs)))
}

fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path.to_owned();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

fn store_checks(store: &Store, checks: &mut Vec<Check>) {
    let meta = store.meta();
    checks.push(check(
        "store",
        Status::Ok,
        format!(
            "{} (format version {})",
            store.root().display(),
            meta.version
        ),
    ));
    // By the store's own fd (what it opened and checked), not by its path again.
    let me = rustix::process::geteuid().as_raw();
    let owner = if me == 0 {
        "root".to_owned()
    } else {
        format!("uid {me}")
    };
    match rustix::fs::fstat(store.root_fd()) {
        Ok(st) => {
            // Store::open refuses a store another user could change; say that it passed.
            checks.push(check(
                "store owner",
                Status::Ok,
                format!(
                    "owned by {owner} (uid {}), like its areas; none writable by group or others",
                    st.st_uid
                ),
            ));
            let mode = st.st_mode & 0o7777;
            checks.push(if mode & 0o077 != 0 {
                check(
                    "store mode",
                    Status::Fail,
                    format!(
                        "{} is mode {mode:o}: other users can reach snapshot contents (secrets); chmod 700 it",
                        store.root().display()
                    ),
                )
            } else {
                check(
                    "store mode",
                    Status::Ok,
                    format!("{mode:o}: only {owner} can reach objects"),
                )
            });
        }
        Err(e) => checks.push(check("store mode", Status::Fail, e.to_string())),
    }
    checks.push(verity_check(store.root(), Some(meta.verity)));
    checks.push(space_check(store.root()));
}

fn verity_check(dir: &Path, recorded: Option<VerityMode>) -> Check {
    let supported = velo_objects::filesystem_supports_verity(dir).unwrap_or(false);
    match (supported, recorded) {
        (true, Some(VerityMode::Enabled)) | (true, None) => check(
            "fs-verity",
            Status::Ok,
            "supported: objects get fs-verity and mounts use verity=require",
        ),
        (true, Some(VerityMode::Unavailable)) => check(
            "fs-verity",
            Status::Warn,
            "the filesystem supports fs-verity now, but this store was created without it: mounts stay unverified",
        ),
        (false, Some(VerityMode::Enabled)) => check(
            "fs-verity",
            Status::Fail,
            "this store requires fs-verity but its filesystem/kernel no longer provides it: mounts will fail",
        ),
        (false, _) => check(
            "fs-verity",
            Status::Warn,
            format!(
                "not supported by this kernel or the filesystem of {}: mounts are labelled unverified; \
                 `velo mount --verify` and `velo fsck` check objects in userspace",
                dir.display()
            ),
        ),
    }
}

fn space_check(dir: &Path) -> Check {
    match rustix::fs::statvfs(dir) {
        Ok(s) => {
            let free = s.f_bavail * s.f_frsize;
            let status = if free < 1 << 30 {
                Status::Warn
            } else {
                Status::Ok
            };
            check(
                "free space",
                status,
                format!("{} free on the store's filesystem", output::bytes(free)),
            )
        }
        Err(e) => check(
            "free space",
            Status::Warn,
            format!("statvfs {}: {e}", dir.display()),
        ),
    }
}

/// Mounts (detached, never attached anywhere) a tiny image over an empty data dir.
fn probe_mount_stack(store: &Path) -> anyhow::Result<velo_mount::ProbeReport> {
    let base = existing_ancestor(store);
    let tmp = tempfile::Builder::new()
        .prefix(".velo-doctor-")
        .tempdir_in(&base)?;
    let image_path = tmp.path().join("probe.erofs");
    let bytes = velo_image::probe_image()?;
    std::fs::File::create(&image_path)?.write_all(&bytes)?;
    let image = std::fs::File::open(&image_path)?;
    let data = std::fs::File::open(tmp.path())?;
    let digest = velo_objects::verity::VerityHasher::digest(&bytes);
    Ok(velo_mount::probe(
        image.as_fd(),
        data.as_fd(),
        &digest,
        &tmp.path().join("attach"),
    )?)
}
