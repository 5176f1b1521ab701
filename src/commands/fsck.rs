//! `velo fsck`.

use std::process::ExitCode;

use velo_objects::Store;

use super::Ctx;
use crate::output;

/// A progress bar over the 256 fan-out directories.
struct Bar(Option<indicatif::ProgressBar>);

impl velo_objects::FsckProgress for Bar {
    fn objects(&self, fanouts_done: usize, objects: u64, bytes: u64) {
        if let Some(b) = &self.0 {
            b.set_position(fanouts_done as u64);
            b.set_message(format!("{objects} objects, {}", output::bytes(bytes)));
        }
    }
}

pub fn fsck(ctx: &Ctx, repair: bool, jobs: Option<usize>) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let store = Store::open(&ctx.store)?;
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let bar = Bar(
        (!ctx.json && !ctx.quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(256);
            if let Ok(s) = indicatif::ProgressStyle::with_template(
                "checking objects [{bar:30}] {pos}/256 {msg}",
            ) {
                b.set_style(s.progress_chars("=> "));
            }
            b
        }),
    );
    let report = velo_image::fsck::fsck(&store, repair, jobs, &bar);
    if let Some(b) = &bar.0 {
        b.finish_and_clear();
    }
    let r = report?;
    if ctx.json {
        output::json(&r)?;
    } else {
        for f in &r.damage {
            outln!(
                "{} {} expected={} found={}",
                f.kind,
                f.path.display(),
                f.expected,
                f.found
            );
        }
        for f in &r.reclaimable {
            ctx.say(format!(
                "reclaimable: {} {} ({})",
                f.kind,
                f.path.display(),
                f.found
            ));
        }
        for line in &r.repaired {
            ctx.say(format!("repaired: {line}"));
        }
        ctx.say(format!(
            "{}: {} objects ({}), {} images, {} refs checked in {:.2} s; {} problems, {} reclaimable; fs-verity {}",
            if r.clean { "clean" } else { "DAMAGED" },
            r.objects_checked,
            output::bytes(r.object_bytes),
            r.images_checked,
            r.refs_checked,
            r.seconds,
            r.damage.len(),
            r.reclaimable.len(),
            match r.verity {
                velo_objects::VerityMode::Enabled => "enabled (kernel digests checked too)",
                velo_objects::VerityMode::Unavailable => "unavailable (userspace hashes only)",
            }
        ));
    }
    Ok(if r.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
