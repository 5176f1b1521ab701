//! `velo mount` and `velo umount`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use velo_mount::{MountRequest, Writes};
use velo_objects::Store;

use super::Ctx;
use crate::output;

pub fn mount(
    ctx: &Ctx,
    image: &str,
    target: &Path,
    cow: bool,
    upper: Option<PathBuf>,
    no_mkdir: bool,
) -> anyhow::Result<ExitCode> {
    velo_mount::privilege::require_root("velo mount")?;
    let store = Store::open(&ctx.store)?;
    let digest = store.resolve(image)?;
    let writes = match (cow, upper) {
        (_, Some(dir)) => Writes::CowUpper(dir),
        (true, None) => Writes::CowManaged,
        (false, None) => Writes::ReadOnly,
    };
    let req = MountRequest {
        image: digest,
        target: target.to_owned(),
        writes,
        create_target: !no_mkdir,
    };
    let r = velo_mount::mount_image(&store, &req)?;
    if ctx.json {
        output::json(&r)?;
    } else {
        let mode = match (&r.upper, r.managed_upper) {
            (None, _) => "read-only".to_owned(),
            (Some(_), true) => "copy-on-write (upper removed at umount)".to_owned(),
            (Some(u), false) => format!("copy-on-write into {}", u.display()),
        };
        let verity = if r.verity == "require" {
            "verified by the kernel (fs-verity)"
        } else {
            "unverified: this store's filesystem has no fs-verity"
        };
        ctx.say(format!(
            "mounted {} at {}: {mode}, {verity}",
            r.image,
            r.target.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn umount(ctx: &Ctx, target: &Path, lazy: bool) -> anyhow::Result<ExitCode> {
    velo_mount::privilege::require_root("velo umount")?;
    let store = Store::open(&ctx.store)?;
    let r = velo_mount::umount(&store, target, lazy)?;
    if ctx.json {
        output::json(&r)?;
    } else {
        ctx.say(format!("unmounted {}", r.target.display()));
        if !r.record_found {
            eprintln!(
                "velo: warning: store {} had no record of this mount; a velo-managed upper dir (if any) was not removed",
                store.root().display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
