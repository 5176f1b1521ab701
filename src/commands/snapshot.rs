//! `velo snapshot`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use velo_image::{SnapshotOptions, snapshot as take_snapshot};
use velo_objects::Store;

use super::Ctx;
use crate::output;
use crate::progress::Bar;

pub fn snapshot(
    ctx: &Ctx,
    dir: &Path,
    ref_name: Option<String>,
    reproducible: bool,
    jobs: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let reproducible = if reproducible {
        Some(match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v
                .trim()
                .parse::<i64>()
                .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"))?,
            Err(_) => 0,
        })
    } else {
        None
    };
    // Check the source before creating a store for it.
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot snapshot {}: {}",
            dir.display(),
            if dir.exists() {
                "not a directory"
            } else {
                "no such directory"
            }
        );
    }
    if ctx.through_service() {
        return snapshot_through_service(ctx, dir, ref_name, reproducible, jobs);
    }
    let store = Store::open_or_create(&ctx.store)?;
    let opts = SnapshotOptions {
        ref_name,
        reproducible,
        jobs,
    };
    let bar = Bar::new(!ctx.json && !ctx.quiet);
    let result = take_snapshot(&store, dir, &opts, &bar);
    bar.finish();
    let r = result
        .with_context(|| format!("snapshot of {} failed; no ref was written", dir.display()))?;
    if ctx.json {
        output::json(&r)?;
    } else {
        ctx.say(format!("{}", r.digest));
        ctx.say(format!(
            "  {} files ({}), {} dirs, {} symlinks; {} new objects ({}), {} reused; {:.2} s{}",
            r.files,
            output::bytes(r.bytes),
            r.dirs,
            r.symlinks,
            r.new_objects,
            output::bytes(r.new_bytes),
            r.reused_objects,
            r.seconds,
            r.ref_name
                .as_deref()
                .map(|n| format!("; ref {n}"))
                .unwrap_or_default(),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// `velo snapshot` as an ordinary user: the tree is hashed here, and velo-mountd takes the
/// image and the objects it lacks, checks them, maps the tree to the user and stores it.
fn snapshot_through_service(
    ctx: &Ctx,
    dir: &Path,
    ref_name: Option<String>,
    reproducible: Option<i64>,
    jobs: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let mut client = ctx.client()?;
    let opts = SnapshotOptions {
        ref_name: None,
        reproducible,
        jobs,
    };
    let bar = Bar::new(!ctx.json && !ctx.quiet);
    let snap = velo_image::snapshot_unstored(dir, &opts, &bar);
    bar.finish();
    let snap =
        snap.with_context(|| format!("snapshot of {} failed; no ref was written", dir.display()))?;
    let r = client
        .import(ref_name.as_deref(), &snap, &|_| {})
        .with_context(|| {
            format!(
                "velo-mountd did not take {}; no ref was written",
                dir.display()
            )
        })?;
    client.done();
    if ctx.json {
        output::json(&serde_json::json!({
            "digest": r.image,
            "ref": r.name,
            "source": snap.report.source,
            "files": snap.report.files,
            "dirs": snap.report.dirs,
            "symlinks": snap.report.symlinks,
            "specials": snap.report.specials,
            "bytes": snap.report.bytes,
            "objects": r.objects,
            "objects_sent": r.objects_sent,
            "new_bytes": r.new_bytes,
            "owners_mapped": r.owners_mapped,
            "setid_cleared": r.setid_cleared,
            "devices_removed": r.devices_removed,
            "xattrs_removed": r.xattrs_removed,
            "image_bytes": snap.report.image_bytes,
            "seconds": snap.report.seconds,
        }))?;
    } else {
        ctx.say(format!("{}", r.image));
        ctx.say(format!(
            "  {} files ({}), {} dirs, {} symlinks; {} objects sent, {} new in the store; {:.2} s{}",
            snap.report.files,
            output::bytes(snap.report.bytes),
            snap.report.dirs,
            snap.report.symlinks,
            r.objects_sent,
            output::bytes(r.new_bytes),
            snap.report.seconds,
            r.name.as_deref().map(|n| format!("; ref {n}")).unwrap_or_default(),
        ));
        let mapped = r.setid_cleared + r.devices_removed + r.xattrs_removed;
        if mapped > 0 {
            ctx.say(format!(
                "  made safe for you: {} set-id bits cleared, {} device nodes and {} extended attributes removed",
                r.setid_cleared, r.devices_removed, r.xattrs_removed
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}
