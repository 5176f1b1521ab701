//! `velo init`, `velo run`, `velo status`.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use velo_objects::Store;

use super::Ctx;
use crate::output;
use velo_project::config::{Config, FILE};
use velo_project::key::CacheAt;
use velo_project::run::{RunOptions, persist_tenant};
use velo_project::user::User;
use velo_project::{detect, project_dir, project_dir_for_init, resolve};

pub fn init(ctx: &Ctx, force: bool) -> anyhow::Result<ExitCode> {
    let project = project_dir_for_init()?;
    if project.join(FILE).exists() && !force {
        anyhow::bail!(
            "{} already exists (use --force to replace it)",
            project.join(FILE).display()
        );
    }
    let config = Config {
        units: detect::detect(&project)?,
    };
    config.check()?;
    let path = config.save(&project)?;
    if ctx.json {
        output::json(&serde_json::json!({ "file": path, "deps": config.units }))?;
    } else {
        ctx.say(format!("wrote {}", path.display()));
        for u in &config.units {
            ctx.say(format!(
                "  {}: {} (keyed by {}; built by `{}`)",
                u.ecosystem,
                u.dirs.join(", "),
                u.inputs.join(", "),
                u.install
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(
    ctx: &Ctx,
    user: Option<String>,
    persist: bool,
    command: Vec<OsString>,
) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        user,
        persist,
        quiet: ctx.quiet,
        socket: ctx.socket.clone(),
    };
    velo_project::run::run(&ctx.store, command, &opts)
}

#[derive(Serialize)]
struct StatusRow {
    project: String,
    ecosystem: String,
    dir: String,
    key: String,
    #[serde(rename = "ref")]
    ref_name: String,
    up_to_date: bool,
    image: Option<velo_objects::Digest>,
    files: Option<u64>,
    bytes: Option<u64>,
    last_used: Option<u64>,
    persisted_bytes: Option<u64>,
}

pub fn status(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let project = project_dir()?;
    let config = Config::load(&project)?;
    let user = User::invoking(None)?;
    let rows = if ctx.through_service() {
        status_through_service(ctx, &project, &config, &user)?
    } else {
        status_of_store(ctx, &project, &config, &user)?
    };
    if ctx.json {
        output::json(&rows)?;
    } else {
        outln!("project {}", project.display());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for r in &rows {
            let state = if r.up_to_date {
                format!(
                    "up to date: {} files, {}, last used {}",
                    r.files.unwrap_or(0),
                    output::bytes(r.bytes.unwrap_or(0)),
                    r.last_used.map_or("never".into(), |t| format!(
                        "{} ago",
                        age(now.saturating_sub(t))
                    ))
                )
            } else {
                "stale: no image for the current lockfile/config yet (the next `velo run` builds it)".into()
            };
            let persisted = r
                .persisted_bytes
                .map(|b| format!("; persisted writes {}", output::bytes(b)))
                .unwrap_or_default();
            outln!(
                "{:<28} {:<6} {}  {state}{persisted}",
                r.dir,
                r.ecosystem,
                r.ref_name
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Status rows from the store itself (root, or a user's own store). A store that does not
/// exist is not created: everything is simply not built yet.
fn status_of_store(
    ctx: &Ctx,
    project: &Path,
    config: &Config,
    user: &User,
) -> anyhow::Result<Vec<StatusRow>> {
    let store = match Store::open(&ctx.store) {
        Ok(s) => Some(s),
        Err(velo_objects::StoreError::NoStore { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let cache_at = match &store {
        Some(s) => CacheAt::Store(s),
        None => CacheAt::Dir(velo_project::user_cache_dir()?),
    };
    let mut rows = Vec::new();
    for d in resolve(&cache_at, project, config, user)? {
        let image = store.as_ref().and_then(|s| s.read_ref(&d.ref_name).ok());
        let summary = image
            .zip(store.as_ref())
            .and_then(|(i, s)| velo_image::inspect::load(s, &i).ok())
            .map(|fs| velo_image::inspect::summarize(&fs));
        let tenant = persist_tenant(project, &d);
        rows.push(StatusRow {
            up_to_date: image.is_some(),
            last_used: image
                .zip(store.as_ref())
                .and_then(|(_, s)| s.ref_last_used(&d.ref_name).ok()),
            files: summary.as_ref().map(|s| s.files),
            bytes: summary.as_ref().map(|s| s.bytes),
            persisted_bytes: store.as_ref().and_then(|s| {
                s.tenant(&tenant)
                    .ok()
                    .and_then(|_| s.tenant_upper_bytes(&tenant).ok())
            }),
            image,
            project: project.display().to_string(),
            ecosystem: d.ecosystem,
            dir: d.dir,
            key: d.key,
            ref_name: d.ref_name,
        });
    }
    Ok(rows)
}

/// Status rows as velo-mountd sees the user's refs.
fn status_through_service(
    ctx: &Ctx,
    project: &Path,
    config: &Config,
    user: &User,
) -> anyhow::Result<Vec<StatusRow>> {
    let cache_at = CacheAt::Dir(velo_project::user_cache_dir()?);
    let dirs = resolve(&cache_at, project, config, user)?;
    let mut client = ctx.client()?;
    let mut rows = Vec::new();
    for d in dirs {
        let tenant = persist_tenant(project, &d);
        let r = client.resolve(&d.ref_name, true, Some(&tenant))?;
        rows.push(StatusRow {
            up_to_date: r.image.is_some(),
            last_used: r.last_used,
            files: r.files,
            bytes: r.bytes,
            persisted_bytes: r.persisted_bytes,
            image: r.image,
            project: project.display().to_string(),
            ecosystem: d.ecosystem,
            dir: d.dir,
            key: d.key,
            ref_name: d.ref_name,
        });
    }
    client.done();
    Ok(rows)
}

fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}
