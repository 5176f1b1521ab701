//! `velo ls` and `velo inspect`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use velo_image::inspect;
use velo_objects::{Digest, Store};

use super::Ctx;
use crate::output;
use velo_project::belongs::{self, Belongs};
use velo_project::key::CacheAt;

#[derive(Serialize)]
struct RefRow {
    name: String,
    digest: Option<Digest>,
    error: Option<String>,
    /// The project dirs a dependency ref was made for (see `velo_project::belongs`).
    belongs_to: Vec<Belongs>,
}

/// A ref as velo-mountd lists it to a user, and the project dirs it was made for.
#[derive(Serialize)]
struct ServiceRefRow {
    #[serde(flatten)]
    entry: velo_mount::protocol::RefEntry,
    belongs_to: Vec<Belongs>,
}

/// `  <- /p (node_modules)` after a ref that belongs to project dirs.
fn belongs_suffix(list: &[Belongs]) -> String {
    if list.is_empty() {
        String::new()
    } else {
        format!("  <- {}", belongs::describe(list))
    }
}

#[derive(Serialize)]
struct ImageRow {
    digest: Digest,
    refs: Vec<String>,
    #[serde(flatten)]
    summary: Option<inspect::ImageSummary>,
    error: Option<String>,
}

#[derive(Serialize)]
struct MountRow {
    target: String,
    image: Digest,
    writable: bool,
    verity: String,
}

#[derive(Serialize)]
struct Listing {
    store: String,
    refs: Vec<RefRow>,
    images: Vec<ImageRow>,
    mounts: Vec<MountRow>,
}

pub fn ls(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if ctx.through_service() {
        let mut client = ctx.client()?;
        let refs = client.refs()?;
        let store = client.hello().store.clone();
        client.done();
        let mut record = velo_project::user_cache_dir()
            .map(|d| belongs::load(&CacheAt::Dir(d)))
            .unwrap_or_default();
        let refs: Vec<ServiceRefRow> = refs
            .into_iter()
            .map(|entry| ServiceRefRow {
                belongs_to: if entry.published {
                    Vec::new()
                } else {
                    record.remove(&entry.name).unwrap_or_default()
                },
                entry,
            })
            .collect();
        if ctx.json {
            output::json(&serde_json::json!({ "store": store, "refs": refs }))?;
        } else {
            ctx.say(format!("store {} (through velo-mountd)", store.display()));
            ctx.say("refs:");
            for r in &refs {
                let published = if r.entry.published {
                    "  (published)"
                } else {
                    ""
                };
                ctx.say(format!(
                    "  {:<40} {}{published}{}",
                    r.entry.name,
                    r.entry.image,
                    belongs_suffix(&r.belongs_to)
                ));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::open(&ctx.store)?;
    let mut record = belongs::load(&CacheAt::Store(&store));
    let mut refs_of: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let refs: Vec<RefRow> = store
        .list_refs()?
        .into_iter()
        .map(|(name, target)| match target {
            Ok(d) => {
                refs_of.entry(d).or_default().push(name.clone());
                RefRow {
                    belongs_to: record.remove(&name).unwrap_or_default(),
                    name,
                    digest: Some(d),
                    error: None,
                }
            }
            Err(e) => RefRow {
                belongs_to: record.remove(&name).unwrap_or_default(),
                name,
                digest: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    let images: Vec<ImageRow> = store
        .list_images()?
        .into_iter()
        .map(|digest| {
            let (summary, error) = match inspect::load(&store, &digest) {
                Ok(fs) => {
                    let mut s = inspect::summarize(&fs);
                    s.image_bytes = store.image_size(&digest).unwrap_or(0);
                    (Some(s), None)
                }
                Err(e) => (None, Some(e.to_string())),
            };
            ImageRow {
                refs: refs_of.get(&digest).cloned().unwrap_or_default(),
                digest,
                summary,
                error,
            }
        })
        .collect();
    let alive = velo_mount::liveness_check();
    let mounts: Vec<MountRow> = store
        .list_mount_records()?
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        // A record whose mount is gone (unmounted behind velo's back, a reboot) is stale:
        // the next mount or gc removes it; it is not listed as a mount.
        .filter(|r| alive(r) != velo_objects::Liveness::Gone)
        .map(|r| MountRow {
            target: r.target.display().to_string(),
            image: r.image,
            writable: r.upper.is_some(),
            verity: r.verity,
        })
        .collect();
    let listing = Listing {
        store: store.root().display().to_string(),
        refs,
        images,
        mounts,
    };
    if ctx.json {
        output::json(&listing)?;
        return Ok(ExitCode::SUCCESS);
    }
    ctx.say(format!("store {}", listing.store));
    ctx.say("refs:");
    if listing.refs.is_empty() {
        ctx.say("  (none)");
    }
    for r in &listing.refs {
        match (&r.digest, &r.error) {
            (Some(d), _) => ctx.say(format!(
                "  {:<40} {}{}",
                r.name,
                d,
                belongs_suffix(&r.belongs_to)
            )),
            (None, Some(e)) => ctx.say(format!("  {:<40} BROKEN: {e}", r.name)),
            _ => {}
        }
    }
    ctx.say("images:");
    if listing.images.is_empty() {
        ctx.say("  (none)");
    }
    for i in &listing.images {
        match (&i.summary, &i.error) {
            (Some(s), _) => ctx.say(format!(
                "  {}  {:>9} image, {:>7} files, {:>9} content{}",
                i.digest,
                output::bytes(s.image_bytes),
                s.files,
                output::bytes(s.bytes),
                if i.refs.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", i.refs.join(", "))
                }
            )),
            (None, Some(e)) => ctx.say(format!("  {}  UNREADABLE: {e}", i.digest)),
            _ => {}
        }
    }
    if !listing.mounts.is_empty() {
        ctx.say("mounts:");
        for m in &listing.mounts {
            ctx.say(format!(
                "  {}  {}  {}, verity {}",
                m.target,
                m.image,
                if m.writable { "cow" } else { "ro" },
                m.verity
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(ctx: &Ctx, image: &str, dump: bool) -> anyhow::Result<ExitCode> {
    let store = Store::open(&ctx.store)?;
    let digest = store.resolve(image)?;
    let fs = inspect::load(&store, &digest)?;
    let mut summary = inspect::summarize(&fs);
    summary.digest = Some(digest);
    summary.image_bytes = store.image_size(&digest)?;
    if dump {
        out!("{}", velo_image::dumpfile(&fs)?);
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.json {
        output::json(&summary)?;
    } else {
        ctx.say(format!(
            "image {digest} ({})",
            output::bytes(summary.image_bytes)
        ));
        ctx.say(format!(
            "  {} files ({}), {} dirs, {} symlinks, {} other; {} objects ({})",
            summary.files,
            output::bytes(summary.bytes),
            summary.dirs,
            summary.symlinks,
            summary.specials,
            summary.objects,
            output::bytes(summary.object_bytes)
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// One file of a profile, as `inspect --profile` shows it.
#[derive(Serialize)]
struct ProfiledFile {
    digest: Digest,
    size: u64,
    hits: u32,
    /// The image's paths with these contents.
    paths: Vec<PathBuf>,
}

/// `inspect --profile`: what runs read first from an image, in read-ahead order.
#[derive(Serialize)]
struct ProfileView {
    image: Digest,
    runs: u32,
    files: usize,
    bytes: u64,
    /// What reading them all ahead takes in the page cache (4 KiB pages).
    cached_bytes: u64,
    entries: Vec<ProfiledFile>,
}

pub fn inspect_profile(ctx: &Ctx, image: &str) -> anyhow::Result<ExitCode> {
    let store = Store::open(&ctx.store)?;
    let digest = store.resolve(image)?;
    let profile = store.read_profile(&digest)?.unwrap_or_default();
    let fs = inspect::load(&store, &digest)?;
    let mut paths: std::collections::HashMap<Digest, Vec<PathBuf>> = Default::default();
    for (d, _, path) in inspect::objects_with_paths(&fs) {
        paths.entry(d).or_default().push(path);
    }
    let view = ProfileView {
        image: digest,
        runs: profile.runs,
        files: profile.entries.len(),
        bytes: profile.bytes(),
        cached_bytes: profile.cached_bytes(),
        entries: profile
            .entries
            .iter()
            .map(|e| ProfiledFile {
                digest: e.digest,
                size: e.size,
                hits: e.hits,
                paths: paths.remove(&e.digest).unwrap_or_default(),
            })
            .collect(),
    };
    if ctx.json {
        output::json(&view)?;
        return Ok(ExitCode::SUCCESS);
    }
    if view.runs == 0 {
        ctx.say(format!(
            "image {digest} has no access profile yet: velo records one over its first {} \
             runs",
            velo_mount::profile::RECORD_RUNS
        ));
        return Ok(ExitCode::SUCCESS);
    }
    ctx.say(format!(
        "profile of image {digest}: {} runs, {} files, {} ({} in the page cache)",
        view.runs,
        view.files,
        output::bytes(view.bytes),
        output::bytes(view.cached_bytes)
    ));
    for e in &view.entries {
        let path = e
            .paths
            .first()
            .map_or_else(|| e.digest.to_hex(), |p| p.display().to_string());
        outln!(
            "{:>3}/{:<3} {:>10}  {path}",
            e.hits,
            view.runs,
            output::bytes(e.size)
        );
    }
    Ok(ExitCode::SUCCESS)
}
