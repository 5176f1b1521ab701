//! The supervising side of `velo run`: computes keys and builds missing images (once, under a
//! lock, in a forked child); then, on the warm path, enters a private mount namespace itself,
//! mounts every dir, starts the command, forwards signals to it, passes its exit status
//! through, and removes the mounts and their copy-on-write layers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::os::fd::AsFd;

use anyhow::{Context, bail};
use velo_mount::protocol::Writes;
use velo_objects::{Digest, Store};

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
    /// `--project`.
    pub project: Option<PathBuf>,
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

fn empty_image(store: &Store) -> anyhow::Result<Digest> {
    let bytes = velo_image::empty_image()?;
    Ok(store.store_bytes(velo_objects::Kind::Image, &bytes)?.digest)
}

/// Runs `argv` with the project's dependency dirs mounted. Root works on the store itself
/// (its mounts through `velo-mountd` where one serves the same store); an ordinary user goes
/// through the service for everything.
pub fn run(store_path: &Path, argv: Vec<OsString>, opts: &RunOptions) -> anyhow::Result<ExitCode> {
    if argv.is_empty() {
        bail!("no command to run");
    }
    let project = project_dir(opts.project.as_deref())?;
    let config = Config::load(&project)?;
    let status = if rustix::process::geteuid().is_root() {
        run_as_root(store_path, &project, &config, &argv, opts)?
    } else {
        run_as_user(&project, &config, &argv, opts)?
    };
    exit_like(status)
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
        let _lock = store.lock_named(&format!("build-{}", unit_dirs[0].key))?;
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
        let empty = empty_image(&store)?;
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
                .unwrap_or(empty)
        };
        let plan = Plan {
            store: store.root().to_owned(),
            project: project.to_owned(),
            user: user.clone(),
            mounts: unit_dirs
                .iter()
                .map(|d| PlannedMount {
                    image: start(d),
                    target: d.path.clone(),
                    tenant: None,
                    snapshot_ref: Some(d.ref_name.clone()),
                })
                .collect(),
            env: unit_env(unit, project).into_iter().collect(),
            env_remove: super::key::install_env(project, unit, &user).1,
        };
        let build = Build {
            install: unit.install.clone(),
            prune_to: prune_to(unit, project),
        };
        let (status, child) = in_child(|| super::child::build(&plan, &build))?;
        super::child::remove_slots_of(&store, child);
        if status != 0 {
            bail!(
                "building {} failed: `{}` exited with {}; no ref was written (its output is above)",
                names,
                unit.install,
                describe_status(status)
            );
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
            snapshot_ref: None,
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
    run_mounted(&plan, argv)
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
        let _lock = lock_file(&cache.join("locks"), &format!("build-{}", unit_dirs[0].key))?;
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
        let env: BTreeMap<String, String> = unit_env(unit, project).into_iter().collect();
        let user = super::user::User::invoking(None)?;
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

/// The lockfile a seeded cargo entry's Cargo home is pruned to after its install.
fn prune_to(unit: &super::config::Unit, project: &Path) -> Option<PathBuf> {
    (unit.seed && unit.ecosystem == "cargo").then(|| project.join("Cargo.lock"))
}

/// An flock on `dir/name`, held until the file is dropped.
fn lock_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("lock {}", path.display()))?;
    Ok(file)
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
        let m = match client.mount(&d.ref_name, writes) {
            Ok(m) => m,
            Err(client::ClientError::Refused {
                kind: velo_mount::protocol::ErrorKind::NotFound,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("mount {}", d.path.display())),
        };
        tracing::debug!(
            "{}: image {}{}",
            d.path.display(),
            m.image,
            if m.reused { " (a warm overlay)" } else { "" }
        );
        mounts.push(m);
    }
    Ok(Some(mounts))
}

/// Enters a namespace of this process's own (`enter`), attaches the mounts there, runs the
/// command, and hands the mounts back.
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
) -> anyhow::Result<i32> {
    enter()?;
    for (d, m) in dirs.iter().zip(&mounts) {
        super::userns::attach(m.fd.as_fd(), &d.path)
            .with_context(|| format!("attach the mount at {}", d.path.display()))?;
    }
    drop(mounts);
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
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork velo's build child");
    }
    if pid == 0 {
        std::process::exit(work());
    }
    Ok((wait_forwarding(pid, || {})?, pid as u32))
}

/// The direct path (root, no service): this process (single-threaded) enters a private mount
/// namespace, mounts every dir there, runs the command; then the mounts go and their
/// discarded uppers with them.
fn run_mounted(plan: &Plan, argv: &[OsString]) -> anyhow::Result<i32> {
    let store = super::child::enter_and_mount(plan)?;
    let targets: Vec<PathBuf> = plan.mounts.iter().map(|m| m.target.clone()).collect();
    let status = start_command(argv, &plan.env, &plan.user, &targets, || {
        // The command is starting (exec and its runtime's start-up take a while): read the
        // images' metadata ahead of its first lookups from here, not before it; after a
        // reboot or a dropped cache also the store's object directories.
        let mut cold = false;
        for m in &plan.mounts {
            cold |= !velo_mount::prefetch_image(&store, &m.image);
        }
        if cold {
            store.prefetch_object_dirs();
        }
    });
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
    match cmd.spawn() {
        Ok(child) => wait_forwarding(child.id() as i32, meanwhile),
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

/// Waits for `pid`, passing signals sent to velo on to it (`meanwhile` runs first, with
/// signals already forwarded). Returns its exit code, or minus the signal number that killed
/// it.
fn wait_forwarding(pid: i32, meanwhile: impl FnOnce()) -> anyhow::Result<i32> {
    let forwarding = forward_signals(pid)?;
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
    for id in forwarding {
        signal_hook_registry::unregister(id);
    }
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

/// Installs handlers that pass signals sent to velo (by a process manager: `kill`) on to the
/// child. Signals from the terminal (Ctrl-C) already reach the whole foreground process group,
/// the command included, so those are not sent twice. No thread: the handler itself calls
/// kill(2), which is async-signal-safe.
fn forward_signals(child: i32) -> anyhow::Result<Vec<signal_hook_registry::SigId>> {
    let mut ids = Vec::new();
    for sig in FORWARDED {
        let handler = move |info: &libc::siginfo_t| {
            let from_terminal = info.si_code == libc::SI_KERNEL;
            if from_terminal && (sig == libc::SIGINT || sig == libc::SIGQUIT) {
                return;
            }
            // SAFETY: kill(2) is async-signal-safe; `child` is a plain integer.
            unsafe { libc::kill(child, sig) };
        };
        // SAFETY: the handler only reads its siginfo and calls kill(2).
        let id = unsafe { signal_hook_registry::register_sigaction(sig, handler) }
            .context("install signal handlers")?;
        ids.push(id);
    }
    Ok(ids)
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
