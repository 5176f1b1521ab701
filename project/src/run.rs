//! The supervising side of `velo run`: computes keys and builds missing images (once, under a
//! lock, in a forked child); then, on the warm path, enters a private mount namespace itself,
//! mounts every dir, starts the command, forwards signals to it, passes its exit status
//! through, and removes the mounts and their copy-on-write layers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use velo_mount::image_cache;
use velo_objects::{Digest, Store};

use super::child::{Build, Plan, PlannedMount};
use super::config::Config;
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

/// Runs `argv` with the project's dependency dirs mounted.
pub fn run(store_path: &Path, argv: Vec<OsString>, opts: &RunOptions) -> anyhow::Result<ExitCode> {
    velo_mount::privilege::require_root("velo run")?;
    let project = project_dir(opts.project.as_deref())?;
    let config = Config::load(&project)?;
    let user = User::invoking(opts.user.as_deref())?;
    let store = Store::open_or_create(store_path)?;
    let dirs = resolve(&store, &project, &config, &user)?;

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
        let plan = Plan {
            store: store.root().to_owned(),
            project: project.clone(),
            user: (user.uid, user.gid),
            mounts: unit_dirs
                .iter()
                .map(|d| PlannedMount {
                    image: empty,
                    target: d.path.clone(),
                    tenant: None,
                    snapshot_ref: Some(d.ref_name.clone()),
                })
                .collect(),
            env: unit_env(unit, &project).into_iter().collect(),
        };
        let build = Build {
            install: unit.install.clone(),
        };
        let status = build_in_child(&store, &plan, &build)?;
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
    }

    let mut env = BTreeMap::new();
    let mut mounts = Vec::new();
    for d in &dirs {
        let image = store.read_ref(&d.ref_name)?;
        store.touch_ref_used(&d.ref_name)?;
        let tenant = if opts.persist {
            let name = persist_tenant(&project, d);
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
    for unit in &config.units {
        env.extend(unit_env(unit, &project));
    }
    let plan = Plan {
        store: store.root().to_owned(),
        project,
        user: (user.uid, user.gid),
        mounts,
        env,
    };
    let shared = shared_layers(&store, &plan);
    drop(store); // reopened inside the namespace
    let status = run_mounted(&plan, &argv, &user, shared)?;
    exit_like(status)
}

/// A wait status as words.
fn describe_status(status: i32) -> String {
    if status >= 0 {
        format!("status {status}")
    } else {
        format!("signal {}", -status)
    }
}

/// Forks the child that builds `plan`'s images, forwards signals to it, waits, and removes
/// its copy-on-write layers. Returns the exit code, or minus the signal number that killed it.
fn build_in_child(store: &Store, plan: &Plan, build: &Build) -> anyhow::Result<i32> {
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
        std::process::exit(super::child::build(plan, build));
    }
    let status = wait_forwarding(pid, || {})?;
    super::child::remove_slots_of(store, pid as u32);
    Ok(status)
}

/// The warm path: this process (single-threaded) enters a private mount namespace, mounts
/// every dir there, starts the command (posix_spawn where no user switch is needed: no copy
/// of velo's memory to make and tear down), forwards signals to it and waits; then the mounts
/// go and their discarded uppers with them.
fn run_mounted(
    plan: &Plan,
    argv: &[OsString],
    user: &User,
    shared: Vec<Option<image_cache::Pending>>,
) -> anyhow::Result<i32> {
    let Some((program, args)) = argv.split_first() else {
        bail!("no command to run");
    };
    let (store, leases) = super::child::enter_and_mount(plan, shared)?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).envs(&plan.env);
    // A working directory inside a mounted dir still points at what is under the mount:
    // enter it again by name. (Only then: a chdir keeps std from using posix_spawn.)
    if let Ok(cwd) = std::env::current_dir()
        && plan.mounts.iter().any(|m| cwd.starts_with(&m.target))
    {
        cmd.current_dir(cwd);
    }
    user.apply(&mut cmd);
    let status = match cmd.spawn() {
        Ok(child) => wait_forwarding(child.id() as i32, || {
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
        }),
        Err(e) => {
            eprintln!("velo: cannot run {}: {e}", program.to_string_lossy());
            Ok(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
    };
    super::child::release(&store, plan, leases);
    status
}

/// Requests a layer from the image cache for each mount of `plan` — a lent overlay for a
/// discarded upper, the EROFS layer for a persisted one — here, in the host's namespace,
/// before entering the run's; the answers are read once inside. Where no cache
/// runs for the store, one is started in the background for the runs to come;
/// `VELO_IMAGE_CACHE=off` leaves it out.
fn shared_layers(store: &Store, plan: &Plan) -> Vec<Option<image_cache::Pending>> {
    if std::env::var_os("VELO_IMAGE_CACHE").is_some_and(|v| v == "off") {
        return Vec::new();
    }
    let mut started = false;
    plan.mounts
        .iter()
        .map(|m| {
            let want = match m.tenant {
                None => image_cache::Want::Lease,
                Some(_) => image_cache::Want::Layer,
            };
            (m, want)
        })
        .map(
            |(m, want)| match image_cache::request(store, &m.image, want) {
                Ok(pending) => Some(pending),
                Err(image_cache::Miss::NoService) => {
                    if !started {
                        start_image_cache(store.root());
                        started = true;
                    }
                    None
                }
                Err(image_cache::Miss::Refused) => None,
            },
        )
        .collect()
}

/// Starts `velo image-cache serve` for the store, detached: its own session (no terminal
/// signals), no stdio, working directory `/`. It exits on its own when idle.
fn start_image_cache(store: &Path) {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--store")
        .arg(store)
        .args(["-q", "image-cache", "serve"])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
    }
    if let Err(e) = cmd.spawn() {
        tracing::debug!("could not start the image cache: {e}");
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
fn exit_like(status: i32) -> anyhow::Result<ExitCode> {
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
