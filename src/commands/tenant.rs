//! `velo tenant …`: named copy-on-write layers over one image.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use velo_mount::{MountRequest, Writes};
use velo_objects::Store;

use super::Ctx;
use crate::cli::TenantCommand;
use crate::output;

fn mount_tenant(
    ctx: &Ctx,
    store: &Store,
    name: &str,
    dir: &Path,
    owner: Option<u32>,
) -> anyhow::Result<velo_mount::MountReport> {
    velo_mount::privilege::require_root("velo tenant mount")?;
    let t = store.tenant(name)?;
    let req = MountRequest {
        image: t.image,
        target: dir.to_owned(),
        writes: Writes::Tenant(name.to_owned()),
        create_target: true,
        owner,
        prefetch: true,
    };
    let r = velo_mount::mount_image(store, &req)?;
    if let Some(from) = &t.from_ref {
        let _ = store.touch_ref_used(from);
    }
    if owner.is_none() {
        ctx.say(format!(
            "mounted tenant {name} ({}) at {}",
            t.image,
            r.target.display()
        ));
    }
    Ok(r)
}

/// Where the tenant is mounted in this mount namespace, if it is.
fn local_mount_point(store: &Store, name: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(at) = velo_mount::tenant_mount_point(store, name)? else {
        return Ok(None);
    };
    let here = velo_mount::mountinfo::read()?
        .iter()
        .any(|m| m.mount_point == at && m.is_velo());
    if here {
        Ok(Some(at))
    } else {
        anyhow::bail!(
            "tenant {name:?} is mounted at {} in another mount namespace (a running `velo` process); it cannot be changed from here",
            at.display()
        )
    }
}

fn refuse_if_mounted(store: &Store, name: &str, action: &str) -> anyhow::Result<()> {
    if let Some(at) = velo_mount::tenant_mount_point(store, name)? {
        anyhow::bail!(
            "cannot {action} tenant {name:?}: it is mounted at {}; `velo tenant umount {name}` first",
            at.display()
        );
    }
    Ok(())
}

pub fn tenant(ctx: &Ctx, command: TenantCommand) -> anyhow::Result<ExitCode> {
    // A commit works in a private mount namespace, so that a mount it makes dies with this
    // process whatever happens to it. It is entered before any thread starts and before the
    // store is opened (overlayfs only takes layers from the caller's own namespace).
    if matches!(&command, TenantCommand::Commit { .. }) {
        velo_mount::privilege::require_root("velo tenant commit")?;
        velo_mount::enter_private_namespace()?;
    }
    let store = Store::open(&ctx.store)?;
    match command {
        TenantCommand::Create {
            name,
            image,
            mount,
            size_limit,
        } => {
            let digest = store.resolve(&image)?;
            let from_ref = (digest.to_hex() != image).then_some(image);
            let t = store.create_tenant_limited(&name, digest, from_ref, size_limit)?;
            store.set_tenant_root(&name, &velo_image::inspect::root_attrs(&store, &digest)?)?;
            if ctx.json && mount.is_none() {
                output::json(&t)?;
            } else {
                ctx.say(format!("created tenant {name} on image {}", t.image));
                if let (Some(limit), Some(how)) = (t.size_limit, &t.limit_enforcement) {
                    ctx.say(format!("  size limit {}: {how}", output::bytes(limit)));
                }
            }
            if let Some(dir) = mount {
                let r = mount_tenant(ctx, &store, &name, &dir, None)?;
                if ctx.json {
                    output::json(&serde_json::json!({ "tenant": t, "mount": r }))?;
                }
            }
        }
        TenantCommand::Ls => {
            let mut rows = Vec::new();
            for (name, t) in store.list_tenants()? {
                match t {
                    Ok(t) => rows.push(serde_json::json!({
                        "name": name,
                        "image": t.image,
                        "from_ref": t.from_ref,
                        "mounted_at": velo_mount::tenant_mount_point(&store, &name)?,
                        "upper_bytes": store.tenant_upper_bytes(&name)?,
                    })),
                    Err(e) => {
                        rows.push(serde_json::json!({ "name": name, "error": e.to_string() }))
                    }
                }
            }
            if ctx.json {
                output::json(&rows)?;
            } else if rows.is_empty() {
                ctx.say("no tenants");
            } else {
                for r in rows {
                    ctx.say(format!(
                        "{:<20} {}  {:>10} written  {}",
                        r["name"].as_str().unwrap_or_default(),
                        r["image"]
                            .as_str()
                            .or(r["error"].as_str())
                            .unwrap_or_default(),
                        output::bytes(r["upper_bytes"].as_u64().unwrap_or(0)),
                        r["mounted_at"]
                            .as_str()
                            .map(|m| format!("mounted at {m}"))
                            .unwrap_or_else(|| "not mounted".into()),
                    ));
                }
            }
        }
        TenantCommand::Mount { name, dir } => {
            let r = mount_tenant(ctx, &store, &name, &dir, None)?;
            if ctx.json {
                output::json(&r)?;
            }
        }
        TenantCommand::Umount { name } => {
            velo_mount::privilege::require_root("velo tenant umount")?;
            store.tenant(&name)?;
            let Some(at) = local_mount_point(&store, &name)? else {
                anyhow::bail!("tenant {name:?} is not mounted");
            };
            let r = velo_mount::umount(&store, &at, false)?;
            if ctx.json {
                output::json(&r)?;
            } else {
                ctx.say(format!("unmounted tenant {name} from {}", at.display()));
            }
        }
        TenantCommand::Diff { name } => {
            let t = store.tenant(&name)?;
            let image = velo_image::inspect::load(&store, &t.image)?;
            let dirs = store.tenant_dirs(&name)?;
            let changes = velo_image::diff::diff_upper(&image, &dirs.upper_path)?;
            if ctx.json {
                output::json(&changes)?;
            } else {
                for c in &changes {
                    let tag = match c.kind {
                        "added" => "A",
                        "changed" => "M",
                        "metadata" => "m",
                        _ => "D",
                    };
                    let detail = c
                        .detail
                        .as_deref()
                        .map(|d| format!("  ({d})"))
                        .unwrap_or_default();
                    outln!("{tag} {}{detail}", c.path.display());
                }
            }
        }
        TenantCommand::Reset { name } => {
            refuse_if_mounted(&store, &name, "reset")?;
            store.reset_tenant(&name)?;
            let image = store.tenant(&name)?.image;
            store.set_tenant_root(&name, &velo_image::inspect::root_attrs(&store, &image)?)?;
            ctx.say(format!("tenant {name}: all writes dropped"));
        }
        TenantCommand::Rm { name } => {
            if !store.is_half_made_tenant(&name) {
                refuse_if_mounted(&store, &name, "remove")?;
            }
            store.remove_tenant(&name)?;
            ctx.say(format!("removed tenant {name}"));
        }
        TenantCommand::Commit { name, ref_name } => {
            velo_objects::validate_ref_name(&ref_name)?;
            store.tenant(&name)?;
            let report = match local_mount_point(&store, &name)? {
                Some(at) => snapshot_view(&store, &at, &ref_name)?,
                None => {
                    // Outside the store (a snapshot never reads the store itself); the mount on it
                    // exists only in this process's namespace.
                    let dir = tempfile::Builder::new()
                        .prefix("velo-commit-")
                        .tempdir()
                        .context("create a private mount point")?;
                    let m = mount_tenant(ctx, &store, &name, dir.path(), Some(std::process::id()))?;
                    let report = snapshot_view(&store, &m.target, &ref_name);
                    velo_mount::umount(&store, &m.target, true)?;
                    report?
                }
            };
            if ctx.json {
                output::json(&report)?;
            } else {
                ctx.say(format!(
                    "{}\n  tenant {name} committed as {ref_name}: {} files, {} new objects ({}), {} reused",
                    report.digest,
                    report.files,
                    report.new_objects,
                    output::bytes(report.new_bytes),
                    report.reused_objects
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshot_view(
    store: &Store,
    view: &Path,
    ref_name: &str,
) -> anyhow::Result<velo_image::SnapshotReport> {
    let opts = velo_image::SnapshotOptions {
        ref_name: Some(ref_name.to_owned()),
        ..Default::default()
    };
    Ok(velo_image::snapshot(
        store,
        view,
        &opts,
        &velo_image::NoProgress,
    )?)
}
