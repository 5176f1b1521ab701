//! The supervising side of `velo run`: computes keys and builds missing images (once, under a
//! lock, in a forked child); then, on the warm path, enters a private mount namespace itself,
//! mounts every dir, starts the command, forwards signals to it, passes its exit status
//! through, and removes the mounts and their copy-on-write layers.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::os::fd::AsFd;

use anyhow::{Context, bail};
use velo_mount::protocol::Writes;
use velo_objects::Store;

use super::build;
use super::child::{Build, Plan, PlannedMount};
use super::client::{self, Client};
use super::config::Config;
use super::key::CacheAt;
use super::seed;
use super::user::User;
use super::{ManagedDir, project_dir, resolve, unit_env};

/// Options of `velo run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--user`.
    pub user: Option<String>,
    /// `--persist`: keep a per-project upper across runs.
    pub persist: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--socket`: velo-mountd's socket.
    pub socket: Option<PathBuf>,
}

/// The tenant that holds a dir's persisted writes (`--persist`): one per project, dir and key.
pub fn persist_tenant(project: &Path, d: &ManagedDir) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h = blake3::Hasher::new();
    h.update(project.as_os_str().as_bytes());
    h.update(b"\0");
    h.update(d.dir.as_bytes());
    format!("run-{}-{}", &h.finalize().to_hex()[..12], &d.key[..12])
}

/// Runs `argv` with the project's dependency dirs mounted. Root works on the store itself
/// (its mounts through `velo-mountd` where one serves the same store); an ordinary user goes
/// through the service for everything.
pub fn run(store_path: &Path, argv: Vec<OsString>, opts: &RunOptions) -> anyhow::Result<ExitCode> {
    if argv.is_empty() {
        bail!("no command to run");
    }
    let project = project_dir()?;
    let config = Config::load(&project)?;
    let status = if rustix::process::geteuid().is_root() {
        run_as_root(store_path, &project, &config, &argv, opts)?
    } else {
        run_as_user(&project, &config, &argv, opts)?
    };
    exit_like(status)
}

/// Says (at `-v`) what decides each dir's tree: the project, the key and what it is made of,
/// and the ref the tree has.
fn log_dirs(project: &Path, config: &Config, dirs: &[ManagedDir]) {
    tracing::info!("project {}", project.display());
    for d in dirs {
        let Some(unit) = config.units.get(d.unit) else {
            continue;
        };
        tracing::info!(
            "{} ({}): key {} from the files {:?}, the versions of {:?}, the variables {:?}*; ref {}",
            d.dir,
            d.ecosystem,
            d.key,
            unit.inputs,
            unit.versions,
            unit.env_prefixes,
            d.ref_name
        );
    }
}

/// The environment every unit of velo.toml sets, `{project}` expanded.
fn units_env(config: &Config, project: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for unit in &config.units {
        env.extend(unit_env(unit, project));
    }
    env
}

/// `velo run` as root: builds into the store directly, as the invoking user (`SUDO_UID`,
/// `--user`), then mounts.
fn run_as_root(
    store_path: &Path,
    project: &Path,
    config: &Config,
    argv: &[OsString],
    opts: &RunOptions,
) -> anyhow::Result<i32> {
    velo_mount::privilege::require_root("velo run")?;
    let user = User::invoking(opts.user.as_deref())?;
    let store = Store::open_or_create(store_path)?;
    let dirs = resolve(&CacheAt::Store(&store), project, config, &user)?;
    log_dirs(project, config, &dirs);
    let venvs = crate::uv::cache_record_venvs(project, config, &dirs);
    let before_command = || crate::uv::agree_cache_records(project, &venvs);

    // Build what is missing, one entry of velo.toml at a time, each key once across processes.
    for (i, unit) in config.units.iter().enumerate() {
        let unit_dirs: Vec<&ManagedDir> = dirs.iter().filter(|d| d.unit == i).collect();
        let missing = |store: &Store| {
            unit_dirs
                .iter()
                .any(|d| store.read_ref(&d.ref_name).is_err())
        };
        if !missing(&store) {
            continue;
        }
        let lock_name = format!("build-{}", unit_dirs[0].key);
        let _lock = take_build_lock(
            &unit.dirs.join(", "),
            opts.quiet,
            || Ok(store.try_lock_named(&lock_name)?),
            || Ok(store.lock_named(&lock_name)?),
        )?;
        if !missing(&store) {
            continue; // another velo run built it while we waited
        }
        let names = unit_dirs
            .iter()
            .map(|d| d.dir.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if !opts.quiet {
            eprintln!(
                "velo: building {} with `{}` (first run for this lockfile)",
                names, unit.install
            );
        }
        // A seeded entry starts from the tree last built for the dir (see `seed`).
        let start = |d: &ManagedDir| {
            unit.seed
                .then(|| {
                    seed::last_built(
                        &CacheAt::Store(&store),
                        (user.uid, user.gid),
                        project,
                        &d.dir,
                    )
                })
                .flatten()
                .and_then(|r| store.read_ref(&r).ok())
        };
        let plan = Plan {
            store: store.root().to_owned(),
            project: project.to_owned(),
            user: user.clone(),
            mounts: Vec::new(),
            env: crate::uv::build_env(unit, project, &user),
            env_remove: super::key::install_env(project, unit, &user).1,
        };
        let build = Build {
            ecosystem: unit.ecosystem.clone(),
            install: unit.install.clone(),
            dirs: unit_dirs
                .iter()
                .map(|d| super::child::BuildDir {
                    target: d.path.clone(),
                    ref_name: d.ref_name.clone(),
                    seed: start(d),
                })
                .collect(),
            place: crate::build::BuildIn::choose()?,
            prune_to: prune_to(unit, project),
            cargo_config: cargo_config(unit, &user, &unit_dirs),
        };
        let (status, child) = in_child(|| super::child::build(&plan, &build))?;
        super::child::remove_slots_of(&store, child);
        if status != 0 {
            return Err(build_failed(&names, &unit.install, status));
        }
        if missing(&store) {
            bail!("the build of {} finished but left no image", unit.ecosystem);
        }
        for d in &unit_dirs {
            seed::record_built(
                &CacheAt::Store(&store),
                (user.uid, user.gid),
                project,
                &d.dir,
                &d.ref_name,
            );
        }
    }

    let env = units_env(config, project);
    // Through velo-mountd where it serves this very store: its overlays are lent again
    // while pristine, so a run's lookups are warm.
    if let Some(client) = root_client(&store, opts)? {
        for d in &dirs {
            store.touch_ref_used(&d.ref_name)?;
            super::child::ensure_target(&d.path, (user.uid, user.gid))?;
        }
        drop(store);
        let mut client = client;
        let mounts = mount_all(&mut client, project, &dirs, opts.persist)?
            .ok_or_else(|| anyhow::anyhow!("velo-mountd does not see the image just built"))?;
        let enter = || velo_mount::enter_private_namespace().map_err(Into::into);
        return attach_and_run(
            client,
            mounts,
            &dirs,
            opts.persist,
            argv,
            &env,
            &user,
            &enter,
            &before_command,
        );
    }

    let mut mounts = Vec::new();
    for d in &dirs {
        let image = store.read_ref(&d.ref_name)?;
        store.touch_ref_used(&d.ref_name)?;
        let tenant = if opts.persist {
            let name = persist_tenant(project, d);
            if store.tenant(&name).is_err() {
                match store.create_tenant(&name, image, Some(d.ref_name.clone())) {
                    Ok(_) => {}
                    Err(e) if store.tenant(&name).is_ok() => {
                        tracing::debug!("tenant created concurrently: {e}")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(name)
        } else {
            None
        };
        mounts.push(PlannedMount {
            image,
            target: d.path.clone(),
            tenant,
        });
    }
    let plan = Plan {
        store: store.root().to_owned(),
        project: project.to_owned(),
        user,
        mounts,
        env,
        env_remove: Vec::new(),
    };
    drop(store); // reopened inside the namespace
    run_mounted(&plan, argv, &before_command)
}

/// A connection to velo-mountd if one serves `store` (root may use it for its mounts).
fn root_client(store: &Store, opts: &RunOptions) -> anyhow::Result<Option<Client>> {
    if std::env::var_os("VELO_MOUNTD").is_some_and(|v| v == "off") {
        return Ok(None);
    }
    let socket = client::socket_path(opts.socket.as_deref());
    match Client::connect(&socket) {
        Ok(c) if same_dir(&c.hello().store, store.root()) => Ok(Some(c)),
        Ok(c) => {
            tracing::debug!(
                "velo-mountd at {} serves {}, not {}: mounting here",
                socket.display(),
                c.hello().store.display(),
                store.root().display()
            );
            Ok(None)
        }
        Err(e) if opts.socket.is_some() => Err(e.into()),
        Err(_) => Ok(None),
    }
}

/// Whether two paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// `velo run` as an ordinary user: everything that needs privilege goes through velo-mountd.
fn run_as_user(
    project: &Path,
    config: &Config,
    argv: &[OsString],
    opts: &RunOptions,
) -> anyhow::Result<i32> {
    if let Some(u) = &opts.user {
        bail!("--user {u} needs root (velo run as an ordinary user runs as that user)");
    }
    let socket = client::socket_path(opts.socket.as_deref());
    let mut client = Client::connect(&socket)?;
    let user = User::invoking(None)?;
    let cache = crate::user_cache_dir()?;
    let dirs = resolve(&CacheAt::Dir(cache.clone()), project, config, &user)?;
    log_dirs(project, config, &dirs);
    let venvs = crate::uv::cache_record_venvs(project, config, &dirs);
    let before_command = || crate::uv::agree_cache_records(project, &venvs);
    for d in &dirs {
        std::fs::create_dir_all(&d.path).with_context(|| format!("create {}", d.path.display()))?;
    }
    let env = units_env(config, project);
    let enter = || super::userns::enter().map_err(Into::into);

    // The warm path asks for the mounts straight away; a missing tree is built, then asked for
    // again on a new connection.
    let mounts = match mount_all(&mut client, project, &dirs, opts.persist)? {
        Some(mounts) => mounts,
        None => {
            client.done_and_wait(); // gives back what was lent before the missing one
            build_missing_as_user(&socket, &cache, project, config, &dirs, opts)?;
            client = Client::connect(&socket)?;
            mount_all(&mut client, project, &dirs, opts.persist)?.ok_or_else(|| {
                anyhow::anyhow!("the build finished but velo-mountd has no image for it")
            })?
        }
    };
    attach_and_run(
        client,
        mounts,
        &dirs,
        opts.persist,
        argv,
        &env,
        &user,
        &enter,
        &before_command,
    )
}

/// Builds, as the user, every unit of velo.toml whose trees velo-mountd does not have for
/// them; each key once across this user's runs (a lock in their cache dir).
fn build_missing_as_user(
    socket: &Path,
    cache: &Path,
    project: &Path,
    config: &Config,
    dirs: &[ManagedDir],
    opts: &RunOptions,
) -> anyhow::Result<()> {
    let mut client = Client::connect(socket)?;
    for (i, unit) in config.units.iter().enumerate() {
        let unit_dirs: Vec<&ManagedDir> = dirs.iter().filter(|d| d.unit == i).collect();
        let missing = |client: &mut Client| -> anyhow::Result<bool> {
            for d in &unit_dirs {
                if client.resolve(&d.ref_name, false, None)?.image.is_none() {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        if !missing(&mut client)? {
            continue;
        }
        // The build runs in a user namespace of the user's: where a setting forbids them, say
        // which (one sentence) before anything starts.
        if let Some(why) = super::userns::Sysctls::read().blocker() {
            bail!("velo cannot make a user namespace: {why}");
        }
        let (lock, path) = lock_file(&cache.join("locks"), &format!("build-{}", unit_dirs[0].key))?;
        let failed = |e: rustix::io::Errno| {
            anyhow::Error::new(e).context(format!("lock {}", path.display()))
        };
        use rustix::fs::FlockOperation::{LockExclusive, NonBlockingLockExclusive};
        take_build_lock(
            &unit.dirs.join(", "),
            opts.quiet,
            || match rustix::fs::flock(&lock, NonBlockingLockExclusive) {
                Ok(()) => Ok(Some(())),
                Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
                Err(e) => Err(failed(e)),
            },
            || rustix::fs::flock(&lock, LockExclusive).map_err(failed),
        )?;
        if !missing(&mut client)? {
            continue; // another run of this user built it while we waited
        }
        if !opts.quiet {
            eprintln!(
                "velo: building {} with `{}` (first run for this lockfile)",
                unit.dirs.join(", "),
                unit.install
            );
        }
        let user = super::user::User::invoking(None)?;
        let env = crate::uv::build_env(unit, project, &user);
        let at = CacheAt::Dir(cache.to_owned());
        build::build_as_user(&build::UserBuild {
            socket,
            project,
            install: &unit.install,
            dirs: unit_dirs.clone(),
            env: &env,
            env_remove: &super::key::install_env(project, unit, &user).1,
            seeds: unit_dirs
                .iter()
                .map(|d| {
                    unit.seed
                        .then(|| seed::last_built(&at, (user.uid, user.gid), project, &d.dir))
                        .flatten()
                })
                .collect(),
            prune_to: prune_to(unit, project),
            cargo_config: cargo_config(unit, &user, &unit_dirs),
        })?;
        if missing(&mut client)? {
            bail!("the build of {} finished but left no image", unit.ecosystem);
        }
        for d in &unit_dirs {
            seed::record_built(&at, (user.uid, user.gid), project, &d.dir, &d.ref_name);
        }
    }
    client.done();
    Ok(())
}

/// The user's cargo config to link into a cargo entry's Cargo home (see `cargo_config`).
fn cargo_config(unit: &super::config::Unit, user: &User, dirs: &[&ManagedDir]) -> Option<PathBuf> {
    if unit.ecosystem != "cargo" {
        return None;
    }
    let managed: Vec<PathBuf> = dirs.iter().map(|d| d.path.clone()).collect();
    crate::cargo_config::user_config(&user.home, &managed)
}

/// The lockfile a seeded cargo entry's Cargo home is pruned to after its install.
fn prune_to(unit: &super::config::Unit, project: &Path) -> Option<PathBuf> {
    (unit.seed && unit.ecosystem == "cargo").then(|| project.join("Cargo.lock"))
}

/// Takes the lock of a build of `names` — at once if nobody holds it; else, saying so, after
/// waiting for the run that holds it (which is building the same key), and for how long.
fn take_build_lock<L>(
    names: &str,
    quiet: bool,
    try_take: impl FnOnce() -> anyhow::Result<Option<L>>,
    take: impl FnOnce() -> anyhow::Result<L>,
) -> anyhow::Result<L> {
    if let Some(lock) = try_take()? {
        return Ok(lock);
    }
    if !quiet {
        eprintln!("velo: another velo run is building {names}; waiting for it");
    }
    let started = std::time::Instant::now();
    let lock = take()?;
    if !quiet {
        eprintln!(
            "velo: waited {:.1} s for the other build of {names}",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(lock)
}

/// The lock file `dir/name` (created if missing), not yet locked: the lock is held from a
/// `flock` on it until the file is dropped.
fn lock_file(dir: &Path, name: &str) -> anyhow::Result<(std::fs::File, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok((file, path))
}

/// Asks velo-mountd for each dir's mount; `None` if one of them has no image yet (the
/// mounts already handed out stay with the connection until it is done).
fn mount_all(
    client: &mut Client,
    project: &Path,
    dirs: &[ManagedDir],
    persist: bool,
) -> anyhow::Result<Option<Vec<client::Mounted>>> {
    let mut mounts = Vec::with_capacity(dirs.len());
    for d in dirs {
        let writes = if persist {
            Writes::Persist(persist_tenant(project, d))
        } else {
            Writes::Discard
        };
        let asked = std::time::Instant::now();
        let m = match client.mount(&d.ref_name, writes) {
            Ok(m) => m,
            Err(client::ClientError::Refused {
                kind: velo_mount::protocol::ErrorKind::NotFound,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("mount {}", d.path.display())),
        };
        tracing::info!(
            "{}: image {}, {} from velo-mountd in {:.2} ms",
            d.dir,
            m.image,
            if m.reused {
                "an overlay lent before"
            } else {
                "a new overlay"
            },
            asked.elapsed().as_secs_f64() * 1e3
        );
        mounts.push(m);
    }
    Ok(Some(mounts))
}

/// Enters a namespace of this process's own (`enter`), attaches the mounts there, runs
/// `before_command` (uv's cache records: see [`crate::uv`]) and the command, and hands the
/// mounts back.
#[allow(clippy::too_many_arguments)]
fn attach_and_run(
    client: Client,
    mounts: Vec<client::Mounted>,
    dirs: &[ManagedDir],
    persist: bool,
    argv: &[OsString],
    env: &BTreeMap<String, String>,
    user: &User,
    enter: &dyn Fn() -> anyhow::Result<()>,
    before_command: &dyn Fn(),
) -> anyhow::Result<i32> {
    enter()?;
    for (d, m) in dirs.iter().zip(&mounts) {
        super::userns::attach(m.fd.as_fd(), &d.path)
            .with_context(|| format!("attach the mount at {}", d.path.display()))?;
    }
    drop(mounts);
    before_command();
    let targets: Vec<PathBuf> = dirs.iter().map(|d| d.path.clone()).collect();
    let status = start_command(argv, env, user, &targets, || {});
    for t in targets.iter().rev() {
        super::userns::detach(t);
    }
    if persist {
        // The next run may need the same persisted upper at once: velo exits only once the
        // service has taken it back.
        client.done_and_wait();
    } else {
        client.done();
    }
    status
}

/// A wait status as words.
/// The exit code a process reports for `status` the way a shell does: its code, or 128 plus
/// the signal that killed it.
pub(crate) fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(1, 255),
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

/// The signal a build's `status` (its exit code, or minus the signal that killed it) says it
/// was stopped by — Ctrl-C, `kill`, a closed terminal — if it was.
pub(crate) fn interrupted_by(status: i32) -> Option<i32> {
    let sig = if status < 0 { -status } else { status - 128 };
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]
        .contains(&sig)
        .then_some(sig)
}

/// The error of a failed build: an [`crate::Interrupted`] (velo then exits the way the build
/// did: 130 for Ctrl-C) if a signal stopped it.
pub(crate) fn build_failed(names: &str, install: &str, status: i32) -> anyhow::Error {
    if let Some(signal) = interrupted_by(status) {
        return anyhow::Error::new(crate::Interrupted { signal }).context(format!(
            "building {names} was interrupted (signal {signal}); no ref was written"
        ));
    }
    anyhow::anyhow!(
        "building {names} failed: `{install}` exited with {}; no ref was written (its output is \
         above)",
        describe_status(status)
    )
}

pub(crate) fn describe_status(status: i32) -> String {
    if status >= 0 {
        format!("status {status}")
    } else {
        format!("signal {}", -status)
    }
}

/// Runs `work` in a forked child (which exits with its result), forwarding signals to it and
/// waiting. Returns the exit code, or minus the signal number that killed it, and the child's
/// pid. The caller must be single-threaded (the child may then allocate, lock and spawn
/// freely).
pub(crate) fn in_child(work: impl FnOnce() -> i32) -> anyhow::Result<(i32, u32)> {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: velo has started no thread at this point (the signal forwarder below starts
    // after the fork and is joined before the next one), so the child is a complete copy of a
    // single-threaded process and may allocate, lock and spawn freely. It never returns here:
    // it exits.
    // Forwarding starts before the fork: a signal that arrives before the child exists is
    // held and passed on then, not lost.
    let forwarding = Forwarding::install(Group::Same)?;
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork velo's build child");
    }
    if pid == 0 {
        Forwarding::reset_in_child();
        std::process::exit(work());
    }
    forwarding.to(pid);
    Ok((wait_for(pid, || {})?, pid as u32))
}

/// The direct path (root, no service): this process (single-threaded) enters a private mount
/// namespace, mounts every dir there, runs `before_command` and the command; then the mounts
/// go and their discarded uppers with them.
fn run_mounted(plan: &Plan, argv: &[OsString], before_command: &dyn Fn()) -> anyhow::Result<i32> {
    let budget = velo_mount::profile::budget_from_env().map_err(anyhow::Error::msg)?;
    let started = std::time::Instant::now();
    let store = super::child::enter_and_mount(plan)?;
    before_command();
    for m in &plan.mounts {
        tracing::info!("{}: image {}", m.target.display(), m.image);
    }
    tracing::info!(
        "mounted {} dirs in {:.2} ms",
        plan.mounts.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    // What the command reads first, for the images whose profiles want more runs (fanotify
    // marks are in place before it starts; events are read on a thread).
    // Each image's profile, read once: it decides the recording and the read-ahead.
    let profiles: Vec<Option<velo_objects::Profile>> = plan
        .mounts
        .iter()
        .map(|m| store.read_profile(&m.image).ok().flatten())
        .collect();
    let recordings: Vec<velo_mount::profile::Recording> = plan
        .mounts
        .iter()
        .zip(&profiles)
        .filter(|(_, p)| velo_mount::profile::wants_recording_of(p.as_ref()))
        .filter_map(|(m, _)| {
            let root = store.root().to_owned();
            let image = m.image;
            velo_mount::profile::Recording::start(
                &store,
                velo_mount::profile::RECORD_WINDOW,
                move |opened| {
                    if let Ok(store) = velo_objects::Store::open(&root) {
                        velo_mount::profile::merge_recorded(&store, &image, &opened);
                    }
                },
            )
        })
        .collect();
    let targets: Vec<PathBuf> = plan.mounts.iter().map(|m| m.target.clone()).collect();
    let status = start_command(argv, &plan.env, &plan.user, &targets, || {
        // The command is starting (exec and its runtime's start-up take a while): read the
        // images' metadata ahead of its first lookups from here, not before it, then the
        // objects their profiles name; without a profile, after a reboot or a dropped cache,
        // the store's object directories.
        let mut cold = false;
        for m in &plan.mounts {
            cold |= !velo_mount::prefetch_image(&store, &m.image);
        }
        let mut profiled = false;
        for (m, p) in plan.mounts.iter().zip(&profiles) {
            let Some(p) = p else { continue };
            let report = velo_mount::profile::prefetch(
                &store,
                p,
                budget,
                velo_mount::profile::PREFETCH_THREADS,
            );
            profiled |= report.profiled > 0;
            tracing::info!("{}: read ahead {report:?}", m.target.display());
        }
        if cold && !profiled {
            store.prefetch_object_dirs();
        }
    });
    for r in recordings {
        r.finish();
    }
    super::child::release(&store, plan);
    status
}

/// Starts the command (posix_spawn where no user switch or directory change is needed: no
/// copy of velo's memory to make and tear down), runs `meanwhile`, and waits for it,
/// forwarding signals. A command that cannot start is 127 (not found) or 126.
fn start_command(
    argv: &[OsString],
    env: &BTreeMap<String, String>,
    user: &User,
    targets: &[PathBuf],
    meanwhile: impl FnOnce(),
) -> anyhow::Result<i32> {
    let Some((program, args)) = argv.split_first() else {
        bail!("no command to run");
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).envs(env);
    // A working directory inside a mounted dir still points at what is under the mount:
    // enter it again by name. (Only then: a chdir keeps std from using posix_spawn.)
    if let Ok(cwd) = std::env::current_dir()
        && targets.iter().any(|t| cwd.starts_with(t))
    {
        cmd.current_dir(cwd);
    }
    user.apply(&mut cmd);
    let group = Group::for_command();
    // Forwarding starts before the spawn: a signal that arrives before the command exists (it
    // may be up and running before `spawn` returns) is held and passed on then, not lost.
    let forwarding = Forwarding::install(group)?;
    if group == Group::Own {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    match cmd.spawn() {
        Ok(child) => {
            forwarding.to(child.id() as i32);
            wait_for(child.id() as i32, meanwhile)
        }
        Err(e) => {
            eprintln!("velo: cannot run {}: {e}", program.to_string_lossy());
            Ok(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
    }
}

/// Which process group the command runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// velo's own, when velo is the terminal's foreground group: the command reads the
    /// terminal, and Ctrl-C reaches it from the kernel (velo does not send it again).
    Same,
    /// A group of its own, led by the command, when velo is not in the foreground of a
    /// terminal (CI, `timeout`, a process manager): a signal sent to velo's group then reaches
    /// the command once, through velo, as it would reach the command run without velo —
    /// never once directly and once forwarded.
    Own,
}

impl Group {
    fn for_command() -> Self {
        // SAFETY: getpgrp(2) and tcgetpgrp(3) on fd 0 touch no memory of ours.
        let foreground = unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
        if foreground { Self::Same } else { Self::Own }
    }
}

/// Waits for `pid` (signals to velo are being forwarded to it: [`Forwarding`]); `meanwhile`
/// runs first. Returns its exit code, or minus the signal number that killed it.
fn wait_for(pid: i32, meanwhile: impl FnOnce()) -> anyhow::Result<i32> {
    meanwhile();
    let status = loop {
        match rustix::process::waitpid(
            rustix::process::Pid::from_raw(pid),
            rustix::process::WaitOptions::empty(),
        ) {
            Ok(Some((_, status))) => break status,
            Ok(None) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e).context("wait for the command"),
        }
    };
    Ok(match (status.exit_status(), status.terminating_signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => -s,
        _ => 1,
    })
}

/// Signals that velo passes on to the command.
const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Where forwarded signals go: the command's pid (or minus its group); 0 while there is no
/// command yet, when they are held in [`PENDING`].
static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Signals (bit per number) that arrived before the command existed.
static PENDING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Handlers that pass signals sent to velo (by a process manager: `kill`) on to the command —
/// to its process group where it leads one ([`Group::Own`]). In velo's own group, signals
/// from the terminal (Ctrl-C) already reach the whole foreground group, the command included,
/// so those are not sent twice. No thread: the handler itself calls kill(2), which is
/// async-signal-safe. Installed before the command exists; [`Forwarding::to`] names it.
struct Forwarding {
    ids: Vec<signal_hook_registry::SigId>,
    group: Group,
}

impl Forwarding {
    fn install(group: Group) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering::SeqCst;
        FORWARD_TO.store(0, SeqCst);
        PENDING.store(0, SeqCst);
        let mut ids = Vec::new();
        for sig in FORWARDED {
            let handler = move |info: &libc::siginfo_t| {
                let from_terminal = info.si_code == libc::SI_KERNEL;
                if group == Group::Same
                    && from_terminal
                    && (sig == libc::SIGINT || sig == libc::SIGQUIT)
                {
                    return;
                }
                match FORWARD_TO.load(SeqCst) {
                    0 => {
                        PENDING.fetch_or(1 << sig, SeqCst);
                    }
                    // SAFETY: kill(2) is async-signal-safe; `to` is a plain integer.
                    to => unsafe {
                        libc::kill(to, sig);
                    },
                }
            };
            // SAFETY: the handler only reads its siginfo and atomics and calls kill(2).
            let id = unsafe { signal_hook_registry::register_sigaction(sig, handler) }
                .context("install signal handlers")?;
            ids.push(id);
        }
        Ok(Self { ids, group })
    }

    /// From now on signals go to `child` (or its group); those held meanwhile go now. (A
    /// handler that runs between the two steps sees the target already set.)
    fn to(&self, child: i32) {
        use std::sync::atomic::Ordering::SeqCst;
        let to = if self.group == Group::Own {
            -child
        } else {
            child
        };
        FORWARD_TO.store(to, SeqCst);
        let held = PENDING.swap(0, SeqCst);
        for sig in FORWARDED {
            if held & (1 << sig) != 0 {
                // SAFETY: kill(2) on a plain integer pid.
                unsafe { libc::kill(to, sig) };
            }
        }
    }

    /// In a forked child that is to do its own work: the default action for the forwarded
    /// signals again (the parent's handlers would hold them for a command that never comes).
    fn reset_in_child() {
        for sig in FORWARDED {
            // SAFETY: resetting a signal's disposition to its default.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook_registry::unregister(id);
        }
        FORWARD_TO.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Exits the way the command did: with its code, or killed by the same signal.
pub fn exit_like(status: i32) -> anyhow::Result<ExitCode> {
    if status >= 0 {
        return Ok(ExitCode::from(status.clamp(0, 255) as u8));
    }
    let sig = -status;
    // SAFETY: resetting a signal to its default action and raising it on ourselves.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    Ok(ExitCode::from((128 + sig).clamp(0, 255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_stopped_by_ctrl_c_or_kill_is_an_interruption_and_a_failure_is_not() {
        assert_eq!(interrupted_by(-libc::SIGINT), Some(libc::SIGINT));
        assert_eq!(interrupted_by(128 + libc::SIGTERM), Some(libc::SIGTERM));
        assert_eq!(interrupted_by(1), None);
        assert_eq!(interrupted_by(-libc::SIGSEGV), None);
        assert_eq!(interrupted_by(128 + libc::SIGKILL), None);
        let e = build_failed("node_modules", "npm ci", 130);
        assert_eq!(
            e.downcast_ref::<crate::Interrupted>().map(|i| i.signal),
            Some(libc::SIGINT)
        );
        let e = build_failed("node_modules", "npm ci", 1);
        assert!(e.downcast_ref::<crate::Interrupted>().is_none());
        assert!(e.to_string().contains("exited with status 1"), "{e}");
    }
}
