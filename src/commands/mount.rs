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
    verify: bool,
) -> anyhow::Result<ExitCode> {
    velo_mount::privilege::require_root("velo mount")?;
    let store = Store::open(&ctx.store)?;
    let digest = store.resolve(image)?;
    let checked = if verify {
        let pool = velo_image::fsck::pool(None)?;
        let v = velo_image::fsck::verify_image(&store, &digest, &pool)?;
        if !v.bad.is_empty() {
            for f in &v.bad {
                eprintln!(
                    "{} {} expected={} found={}",
                    f.kind,
                    f.path.display(),
                    f.expected,
                    f.found
                );
            }
            if ctx.json {
                output::json(&serde_json::json!({ "error": "verification failed", "bad": v.bad }))?;
            }
            if v.bad.iter().any(|f| f.kind.starts_with("image-")) {
                anyhow::bail!(
                    "refusing to mount {digest}: the image itself failed verification (listed \
                     above; an image that does not rebuild to the same bytes with velo's writer \
                     was not written by velo or was edited); run `velo fsck`"
                );
            }
            anyhow::bail!(
                "refusing to mount {digest}: {} of its {} objects failed verification (listed above)",
                v.bad.len(),
                v.objects
            );
        }
        Some(v)
    } else {
        None
    };
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
        owner: None,
        prefetch: true,
    };
    let budget = velo_mount::profile::budget_from_env().map_err(anyhow::Error::msg)?;
    let r = velo_mount::mount_image(&store, &req)?;
    // The image's access profile, if it has one: what commands read first is read in now, so
    // that the first command on the mount (an init container's app) starts warm.
    let ahead = velo_mount::profile::prefetch_profile(
        &store,
        &digest,
        budget,
        velo_mount::profile::PREFETCH_THREADS,
    );
    // The mount is made: a ref's last use that cannot be recorded only ages the ref for GC.
    if digest.to_hex() != image
        && let Err(e) = store.touch_ref_used(image)
    {
        eprintln!("velo: warning: the use of ref {image} was not recorded: {e}");
    }
    if ctx.json {
        let mut v = serde_json::to_value(&r)?;
        v["read_ahead"] = serde_json::to_value(&ahead)?;
        v["userspace_verified"] = serde_json::json!(checked.as_ref().map(|c| serde_json::json!({
            "objects": c.objects, "bytes": c.bytes, "seconds": c.seconds
        })));
        output::json(&v)?;
    } else {
        let mode = match (&r.upper, r.managed_upper) {
            (None, _) => "read-only".to_owned(),
            (Some(_), true) => "copy-on-write (upper removed at umount)".to_owned(),
            (Some(u), false) => format!("copy-on-write into {}", u.display()),
        };
        let verity = match (r.verity, &checked) {
            ("require", _) => "verified by the kernel on every read (fs-verity)".to_owned(),
            (_, Some(c)) => format!(
                "not verified by the kernel (no fs-verity here); the image and its {} objects ({}) were re-hashed in userspace before mounting",
                c.objects,
                output::bytes(c.bytes)
            ),
            (_, None) => "unverified: this store's filesystem has no fs-verity (use --verify to re-hash before mounting)".to_owned(),
        };
        ctx.say(format!(
            "mounted {} at {}: {mode}, {verity}",
            r.image,
            r.target.display()
        ));
        if ahead.files > 0 {
            ctx.say(format!(
                "  read ahead {} files ({}) its access profile names{}",
                ahead.files,
                output::bytes(ahead.bytes),
                if ahead.capped {
                    " (cut short by VELO_PREFETCH_BYTES)"
                } else {
                    ""
                }
            ));
        }
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
