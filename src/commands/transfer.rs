//! `velo push`, `velo pull`, `velo export`, `velo import`: the arguments in, the report out.
//! The work is in the `velo-distribution` crate.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use velo_distribution::{OciAddress, PullOptions, PushOptions};
use velo_objects::{Digest, Store};

use super::Ctx;
use crate::cli::RegistryArgs;
use crate::output;

/// Parses a size: a number of bytes with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n >= velo_distribution::pack::MIN_PACK_TARGET)
        .ok_or_else(|| {
            format!("{text:?} is not a size of at least 64K (a number of bytes, or with K, M or G)")
        })
}

/// A progress bar (stderr, only on a terminal, not with --json/-q): bytes and objects.
struct Bar {
    bar: Option<ProgressBar>,
    objects: std::sync::atomic::AtomicU64,
    total_objects: std::sync::atomic::AtomicU64,
    verb: &'static str,
}

impl Bar {
    fn new(ctx: &Ctx, verb: &'static str) -> Self {
        let bar = (!ctx.json && !ctx.quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(verb);
            b
        });
        Self {
            bar,
            objects: Default::default(),
            total_objects: Default::default(),
            verb,
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl velo_distribution::Progress for Bar {
    fn start(&self, bytes: u64, objects: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.total_objects.store(objects, Relaxed);
        if let Some(b) = &self.bar {
            b.set_length(bytes);
            b.set_message(format!("{}: 0/{objects} objects", self.verb));
        }
    }

    fn advance(&self, bytes: u64, objects: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let done = self.objects.fetch_add(objects, Relaxed) + objects;
        if let Some(b) = &self.bar {
            b.inc(bytes);
            if objects > 0 {
                b.set_message(format!(
                    "{}: {done}/{} objects",
                    self.verb,
                    self.total_objects.load(Relaxed)
                ));
            }
        }
    }
}

pub fn push(
    ctx: &Ctx,
    image: &str,
    destination: &str,
    registry: &RegistryArgs,
    pack_size: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let dest = OciAddress::parse(destination, registry.plain_http)?;
    let _scratch;
    let store = if ctx.through_service() {
        let (s, store) = from_service(ctx, image, "push")?;
        _scratch = s;
        Arc::new(store)
    } else {
        Arc::new(Store::open(&ctx.store)?)
    };
    let opts = PushOptions {
        jobs: registry.jobs.max(1),
        pack_target: pack_size.unwrap_or(velo_distribution::pack::DEFAULT_PACK_TARGET),
    };
    let bar = Bar::new(ctx, "pushing");
    let result = velo_distribution::push(store, image, &dest, &opts, &bar);
    bar.finish();
    let r = result.with_context(|| format!("push of {image} to {dest} failed"))?;
    if ctx.json {
        output::json(&r)?;
    } else {
        ctx.say(format!("{} → {}", r.image, r.destination));
        ctx.say(format!(
            "  {} objects ({}) in {} blobs: {} sent ({}), {} already there; {:.2} s{}; manifest {}",
            r.objects,
            output::bytes(r.object_bytes),
            r.blobs,
            r.blobs_sent,
            output::bytes(r.bytes_sent),
            r.blobs_skipped,
            r.seconds,
            retries(r.retries),
            r.manifest
        ));
        say_sent_profile(ctx, r.profile.as_ref());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(
    ctx: &Ctx,
    source: &str,
    ref_name: Option<String>,
    digest: Option<String>,
    registry: &RegistryArgs,
) -> anyhow::Result<ExitCode> {
    let src = OciAddress::parse(source, registry.plain_http)?;
    let expect = digest
        .as_deref()
        .map(Digest::parse)
        .transpose()
        .context("--digest takes an image digest (64 hex digits, as `velo snapshot` prints)")?;
    if let Some(r) = &ref_name {
        velo_objects::validate_ref_name(r)?;
    }
    let scratch = ctx
        .through_service()
        .then(|| Scratch::new("pull"))
        .transpose()?;
    let store = Arc::new(match &scratch {
        Some(s) => Store::open_or_create(&s.0)?,
        None => Store::open_or_create(&ctx.store)?,
    });
    let opts = PullOptions {
        jobs: registry.jobs.max(1),
        ref_name: if scratch.is_some() {
            None
        } else {
            ref_name.clone()
        },
        expect,
    };
    let bar = Bar::new(ctx, "pulling");
    let result = velo_distribution::pull(store.clone(), &src, &opts, &bar);
    bar.finish();
    let mut r = result.with_context(|| format!("pull of {src} failed; no ref was written"))?;
    if scratch.is_some() {
        let stored = to_service(ctx, &store, &r.image, ref_name.as_deref())
            .with_context(|| format!("velo-mountd did not take {src}; no ref was written"))?;
        if stored.image != r.image {
            ctx.say(format!(
                "velo: stored for you (owners mapped to you) as image {}",
                stored.image
            ));
        }
        r.ref_name = stored.name;
        r.profile = stored.profile;
    }
    if ctx.json {
        output::json(&r)?;
    } else {
        ctx.say(format!("{}", r.image));
        say_profile(ctx, &r.profile);
        ctx.say(format!(
            "  {} objects ({}): {} fetched, {} already here; {} of {} blobs downloaded ({}); {:.2} s{}{}",
            r.objects,
            output::bytes(r.object_bytes),
            r.objects_fetched,
            r.objects_present,
            r.blobs_fetched,
            r.blobs,
            output::bytes(r.bytes_received),
            r.seconds,
            retries(r.retries),
            match &r.ref_name {
                Some(n) => format!("; ref {n}"),
                None => "; no ref written (use --ref NAME)".into(),
            }
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// What became of the access profile that came with an image (a dropped one was also a
/// warning).
fn say_profile(ctx: &Ctx, outcome: &velo_objects::ProfileOutcome) {
    use velo_objects::ProfileOutcome as O;
    match outcome {
        O::None => {}
        O::Stored { runs, files } => ctx.say(format!(
            "  access profile: {files} files read ahead on the first run ({runs} runs recorded)"
        )),
        O::KeptLocal { runs, .. } => ctx.say(format!(
            "  access profile: this store's own, of {runs} runs, is kept"
        )),
        O::Dropped { reason } => ctx.say(format!("  access profile: dropped ({reason})")),
    }
}

/// The access profile a push or export sent beside the image.
fn say_sent_profile(ctx: &Ctx, sent: Option<&velo_distribution::ProfileSent>) {
    if let Some(p) = sent {
        ctx.say(format!(
            "  with its access profile: {} files, {} runs ({})",
            p.files,
            p.runs,
            output::bytes(p.bytes)
        ));
    }
}

/// " (N retries)" when requests had to be made again.
fn retries(n: u64) -> String {
    match n {
        0 => String::new(),
        1 => " (1 retry)".into(),
        n => format!(" ({n} retries)"),
    }
}

pub fn export(ctx: &Ctx, image: &str, file: &Path) -> anyhow::Result<ExitCode> {
    let _scratch;
    let store = if ctx.through_service() {
        let (s, store) = from_service(ctx, image, "export")?;
        _scratch = s;
        store
    } else {
        Store::open(&ctx.store)?
    };
    let to_stdout = file.as_os_str() == "-";
    if to_stdout && ctx.json {
        anyhow::bail!("--json and an export to standard output (`-`) would mix on stdout");
    }
    let bar = Bar::new(ctx, "exporting");
    let result = velo_distribution::export(&store, image, file, &bar);
    bar.finish();
    let r = result.with_context(|| format!("export of {image} to {} failed", file.display()))?;
    if ctx.json {
        output::json(&r)?;
    } else if !to_stdout {
        ctx.say(format!("{} → {}", r.image, r.file));
        ctx.say(format!(
            "  {} objects ({}), {} written; {:.2} s",
            r.objects,
            output::bytes(r.object_bytes),
            output::bytes(r.bytes_written),
            r.seconds
        ));
        say_sent_profile(ctx, r.profile.as_ref());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn import(
    ctx: &Ctx,
    file: &Path,
    ref_name: Option<String>,
    no_ref: bool,
) -> anyhow::Result<ExitCode> {
    let scratch = ctx
        .through_service()
        .then(|| Scratch::new("import"))
        .transpose()?;
    let store = match &scratch {
        Some(s) => Store::open_or_create(&s.0)?,
        None => Store::open_or_create(&ctx.store)?,
    };
    let bar = Bar::new(ctx, "importing");
    let result = velo_distribution::import(&store, file, ref_name.as_deref(), no_ref, &bar);
    bar.finish();
    let mut r = result
        .with_context(|| format!("import of {} failed; no ref was written", file.display()))?;
    if scratch.is_some() {
        let stored =
            to_service(ctx, &store, &r.image, r.ref_name.as_deref()).with_context(|| {
                format!(
                    "velo-mountd did not take {}; no ref was written",
                    file.display()
                )
            })?;
        r.image = stored.image;
        r.ref_name = stored.name;
        r.profile = stored.profile;
    }
    if ctx.json {
        output::json(&r)?;
    } else {
        ctx.say(format!("{}", r.image));
        say_profile(ctx, &r.profile);
        ctx.say(format!(
            "  {} objects: {} new, {} already here; {:.2} s{}",
            r.objects,
            r.objects_new,
            r.objects_present,
            r.seconds,
            r.ref_name
                .as_deref()
                .map(|n| format!("; ref {n}"))
                .unwrap_or_default()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// A store of the user's own for one transfer (an ordinary user never opens velo-mountd's):
/// what arrives is checked there, then handed to the service, which checks it again. Removed
/// on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(verb: &str) -> anyhow::Result<Self> {
        let dir = velo_project::user_cache_dir()?
            .join("transfer")
            .join(format!("{verb}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The user's ref `image`, its image and objects copied from velo-mountd (every byte checked)
/// into a scratch store, under the same ref name.
fn from_service(ctx: &Ctx, image: &str, verb: &str) -> anyhow::Result<(Scratch, Store)> {
    let scratch = Scratch::new(verb)?;
    let store = Store::open_or_create(&scratch.0)?;
    let mut client = ctx.client()?;
    let digest = client
        .export_into(image, &store, &|_| {})
        .with_context(|| format!("get {image} from velo-mountd"))?;
    client.done();
    store.write_ref(image, &digest)?;
    Ok((scratch, store))
}

/// Hands the image `image` of the scratch store `store` to velo-mountd (under `ref_name` in
/// the user's namespace).
fn to_service(
    ctx: &Ctx,
    store: &Store,
    image: &Digest,
    ref_name: Option<&str>,
) -> anyhow::Result<velo_mount::protocol::ImportSummary> {
    let bytes = velo_image::inspect::read_image_bytes(store, image)?;
    let fs = velo_image::read_image(&bytes, &image.to_hex())?;
    let objects: Vec<velo_image::UnstoredObject> = velo_image::inspect::objects_in_path_order(&fs)
        .into_iter()
        .map(|(digest, size)| velo_image::UnstoredObject {
            path: store.object_path(&digest),
            digest,
            size,
        })
        .collect();
    // The access profile the transfer brought (the service checks it again).
    let profile = store
        .read_profile(image)
        .ok()
        .flatten()
        .map(|p| p.to_bytes());
    let mut client = ctx.client()?;
    let r = client.import_parts(
        ref_name,
        image,
        &bytes,
        &objects,
        profile.as_deref(),
        &|_| {},
    )?;
    client.done();
    Ok(r)
}
