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
