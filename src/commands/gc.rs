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
    let hooks = GcHooks {
        objects_of: &objects_of,
        liveness: &velo_mount::liveness,
    };
    let r = store.gc(&opts, &hooks)?;
    if !opts.dry_run && r.images_removed > 0 {
        // Let go of the superblocks of collected images (the cache starts again on demand).
        velo_mount::image_cache::stop(&store);
    }
    if !opts.dry_run {
        // Overlay dirs an image cache left behind (killed, or stopped while they were in use).
        velo_mount::image_cache::remove_orphan_leases(&store);
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
        if let Some(why) = &r.objects_skipped {
            eprintln!("velo: warning: objects were not collected: {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn refs(ctx: &Ctx, command: RefCommand) -> anyhow::Result<ExitCode> {
    let store = Store::open(&ctx.store)?;
    match command {
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
