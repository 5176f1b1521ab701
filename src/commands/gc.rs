//! `velo gc` and `velo ref`.

use std::process::ExitCode;

use velo_objects::{GcHooks, GcOptions, Store};

use super::Ctx;
use crate::cli::RefCommand;
use crate::output;

pub fn gc(ctx: &Ctx, opts: GcOptions) -> anyhow::Result<ExitCode> {
    let store = Store::open(&ctx.store)?;
    let objects_of = |d: &velo_objects::Digest| {
        velo_image::inspect::load(&store, d)
            .map(|fs| {
                velo_image::inspect::objects(&fs)
                    .into_iter()
                    .map(|(d, _)| d)
                    .collect()
            })
            .map_err(|e| e.to_string())
    };
    let liveness = velo_mount::liveness_check();
    let hooks = GcHooks {
        objects_of: &objects_of,
        liveness: &liveness,
        mounted_images: &velo_mount::lease::mounted_images,
    };
    let r = store.gc(&opts, &hooks)?;
    if !opts.dry_run {
        // Overlay dirs a velo-mountd left behind (killed, or stopped while they were in use).
        velo_mount::service::remove_orphan_leases(&store);
    }
    if ctx.json {
        output::json(&r)?;
    } else {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        for name in &r.refs_expired {
            ctx.say(format!("{verb} unused ref {name}"));
        }
        ctx.say(format!(
            "{verb} {} images ({}) and {} objects ({}); kept {} images and {} objects; {} history entries and {} stale pins dropped; {:.2} s",
            r.images_removed,
            output::bytes(r.image_bytes_freed),
            r.objects_removed,
            output::bytes(r.object_bytes_freed),
            r.images_kept,
            r.objects_kept,
            r.history_dropped,
            r.stale_pins_cleared,
            r.seconds
        ));
        if r.tmp_leftovers_removed > 0 {
            ctx.say(format!(
                "{verb} {} leftovers of interrupted writers from tmp/",
                r.tmp_leftovers_removed
            ));
        }
        if let Some(why) = &r.objects_skipped {
            eprintln!("velo: warning: objects were not collected: {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn refs(ctx: &Ctx, command: RefCommand) -> anyhow::Result<ExitCode> {
    if ctx.through_service() {
        return refs_through_service(ctx, command);
    }
    let store = Store::open(&ctx.store)?;
    match command {
        RefCommand::Publish { name, public_name } => {
            velo_mount::privilege::require_root("velo ref publish")?;
            let image = store.read_ref(&name)?;
            check_publishable(&store, &image, &name)?;
            let public = public_name.unwrap_or_else(|| name.clone());
            let stored = velo_mount::service::namespace::published_ref(&public);
            store.write_ref(&stored, &image)?;
            if ctx.json {
                output::json(&serde_json::json!({ "published": public, "image": image }))?;
            } else {
                ctx.say(format!(
                    "published {name} as {public} ({image}): every user may now mount it read-only"
                ));
            }
        }
        RefCommand::Ls => {
            let mut rows = Vec::new();
            for (name, target) in store.list_refs()? {
                let used = store.ref_last_used(&name)?;
                rows.push(serde_json::json!({
                    "name": name,
                    "digest": target.as_ref().ok(),
                    "error": target.as_ref().err().map(|e| e.to_string()),
                    "last_used": used,
                }));
            }
            if ctx.json {
                output::json(&rows)?;
            } else {
                for r in &rows {
                    ctx.say(format!(
                        "{:<40} {}",
                        r["name"].as_str().unwrap_or_default(),
                        r["digest"]
                            .as_str()
                            .or(r["error"].as_str())
                            .unwrap_or_default()
                    ));
                }
            }
        }
        RefCommand::Rm { name } => {
            store.remove_ref(&name)?;
            if ctx.json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                ctx.say(format!(
                    "removed ref {name} (its image stays until `velo gc`)"
                ));
            }
        }
        RefCommand::History { name } => {
            let mut h = store.ref_history(&name)?;
            h.reverse();
            if ctx.json {
                let rows: Vec<_> = h
                    .iter()
                    .map(|(t, d)| serde_json::json!({ "replaced": t, "digest": d }))
                    .collect();
                output::json(&rows)?;
            } else {
                if let Ok(cur) = store.read_ref(&name) {
                    ctx.say(format!("current      {cur}"));
                }
                for (t, d) in h {
                    ctx.say(format!("replaced at {t}  {d}"));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses to publish an image that holds set-id files, device nodes or file capabilities:
/// users mount published images in namespaces of their own, where they could clear `nosuid`.
fn check_publishable(
    store: &Store,
    image: &velo_objects::Digest,
    name: &str,
) -> anyhow::Result<()> {
    let mut fs = velo_image::inspect::load(store, image)?;
    let r = velo_image::map_to_user(&mut fs, 0, 0);
    let caps = r
        .xattrs_dropped
        .get("security.capability")
        .copied()
        .unwrap_or(0);
    if r.set_id_cleared > 0 || r.devices_removed > 0 || caps > 0 {
        anyhow::bail!(
            "{name} ({image}) is not published: it holds {} set-id files, {} device nodes ({}) \
             and {caps} files with capabilities; users could use them in namespaces of their \
             own. Snapshot the tree without them and publish that",
            r.set_id_cleared,
            r.devices_removed,
            r.device_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `velo ref …` for an ordinary user: their own refs and the published ones, through
/// velo-mountd.
fn refs_through_service(ctx: &Ctx, command: RefCommand) -> anyhow::Result<ExitCode> {
    let mut client = ctx.client()?;
    match command {
        RefCommand::Ls => {
            let refs = client.refs()?;
            if ctx.json {
                output::json(&refs)?;
            } else {
                for r in &refs {
                    let published = if r.published { "  (published)" } else { "" };
                    ctx.say(format!("{:<40} {}{published}", r.name, r.image));
                }
            }
        }
        RefCommand::Rm { name } => {
            client.remove_ref(&name)?;
            if ctx.json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                ctx.say(format!("removed ref {name}"));
            }
        }
        RefCommand::History { .. } => {
            anyhow::bail!("velo ref history needs root (the service does not show history)")
        }
        RefCommand::Publish { .. } => {
            velo_mount::privilege::require_root("velo ref publish")?;
        }
    }
    client.done();
    Ok(ExitCode::SUCCESS)
}
