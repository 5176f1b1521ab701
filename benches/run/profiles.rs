//! (e) Access profiles: a cold `velo run` whose image has a profile (velo-mountd reads the
//! files the command reads first ahead, in parallel, as it lends the mount) against the same
//! imports on the tree on local disk, and what a profile costs when it is missing, being
//! recorded or wrong.
//!
//! The profile is the one velo-mountd records itself over the first three `velo run`s of the
//! import program. The other states are set by writing the store's `profiles/<image>` file
//! (velo-mountd notices a changed file at the next lend):
//!
//! * "as before": a settled profile (3 runs) that names nothing — no read-ahead of objects and
//!   no recording, which is what velo did before profiles;
//! * "first run": no profile — velo-mountd records the run (and this bench puts the real
//!   profile back once the recording is written);
//! * "profile": the recorded profile;
//! * "another command's profile": the profile of a command that imports other modules (also
//!   recorded by velo-mountd), so the read-ahead reads much the command does not need.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::import::{self, Lang, Sample, Side};
use crate::mountd::Mountd;
use crate::setup::{Env, Tree};
use crate::stats::{Series, Verdict, print_table, print_verdicts};
use crate::sys::{self, LoopExt4, drop_caches, run, timed};

/// Runs the service records before a profile is settled (`velo_mount::profile::RECORD_RUNS`).
const RECORD_RUNS: u64 = 3;
/// Runs after which a profile that names nothing is settled (`RECORD_RUNS_EMPTY`).
const RECORD_RUNS_EMPTY: u64 = 10;
/// Cold `velo run` at most this fraction of the native cold time.
const COLD_TARGET: f64 = 0.8;
/// Warm `velo run` at most this many percent over native.
const WARM_TARGET_PCT: f64 = 3.0;
/// A missing or wrong profile costs a cold run at most this many percent (the noise of this
/// machine's disk is about as large).
const MISS_TARGET_PCT: f64 = 5.0;
/// Read-ahead memory at most this multiple of the profile's bytes in the page cache.
const MEMORY_TARGET: f64 = 1.1;

/// What `profiles/<image>` holds for a run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    AsBefore,
    FirstRun,
    Profile,
    Other,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::AsBefore => "velo run, as before (no read-ahead, not recorded)",
            State::FirstRun => "velo run, first run (no profile: recorded)",
            State::Profile => "velo run, profile read ahead",
            State::Other => "velo run, another command's profile read ahead",
        }
    }
}

/// The profile file of `tree`'s image and the contents the states need.
struct Profiles {
    path: PathBuf,
    main: Vec<u8>,
    other: Vec<u8>,
    empty: Vec<u8>,
}

impl Profiles {
    fn set(&self, state: State) {
        match state {
            State::AsBefore => write_atomic(&self.path, &self.empty),
            State::FirstRun => remove(&self.path),
            State::Profile => write_atomic(&self.path, &self.main),
            State::Other => write_atomic(&self.path, &self.other),
        }
    }

    /// After a first run: waits until velo-mountd has written what it recorded, then puts the
    /// real profile back.
    fn after(&self, state: State) {
        if state == State::FirstRun {
            wait_for_runs(&self.path, 1);
            write_atomic(&self.path, &self.main);
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("bench-tmp");
    std::fs::write(&tmp, bytes).expect("write a profile");
    std::fs::rename(&tmp, path).expect("rename a profile");
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

fn runs_of(path: &Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|b| velo_objects::Profile::parse(&b).ok())
        .map_or(0, |p| u64::from(p.runs))
}

/// Waits (at most two minutes) until the profile has at least `runs` runs; returns its bytes.
fn wait_for_runs(path: &Path, runs: u64) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while runs_of(path) < runs {
        assert!(
            Instant::now() < deadline,
            "velo-mountd wrote no profile of {runs} runs at {} (its log: {})",
            path.display(),
            path.ancestors()
                .nth(4)
                .map(|run| run.join("velo-mountd.log").display().to_string())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read(path).expect("read the profile")
}

/// `bytes` with its run count set to `runs` (so that runs using it are not recorded).
fn with_runs(bytes: &[u8], runs: u64) -> Vec<u8> {
    let mut p = velo_objects::Profile::parse(bytes).expect("a profile");
    p.runs = u32::try_from(runs).expect("a run count");
    p.to_bytes()
}

/// Records the profiles (velo-mountd does: the first runs over an image), returns them.
fn record(env: &Env, tree: &Tree, lang: Lang) -> Profiles {
    let path = env.store.join("profiles").join(&tree.image);
    remove(&path);
    for i in 1..=RECORD_RUNS {
        run(&mut env.velo_run(&tree.velo_project, lang.argv()));
        wait_for_runs(&path, i);
    }
    let main = std::fs::read(&path).expect("read the profile");
    remove(&path);
    run(&mut env.velo_run(&tree.velo_project, lang.argv_of(lang.other_modules())));
    let other = with_runs(&wait_for_runs(&path, 1), RECORD_RUNS);
    let empty = format!(r#"{{"version":1,"runs":{RECORD_RUNS_EMPTY},"files":[]}}"#).into_bytes();
    write_atomic(&path, &main);
    Profiles {
        path,
        main,
        other,
        empty,
    }
}

/// Prints what a profile holds; returns its bytes in the page cache.
fn describe_profile(tree: &Tree, what: &str, bytes: &[u8]) -> u64 {
    let p = velo_objects::Profile::parse(bytes).expect("a profile");
    println!(
        "  {what}: {} runs, {} of the tree's {} files, {:.1} MiB of its {:.1} MiB ({:.1} MiB in the page cache)",
        p.runs,
        p.entries.len(),
        tree.files,
        p.bytes() as f64 / 1048576.0,
        tree.bytes as f64 / 1048576.0,
        p.cached_bytes() as f64 / 1048576.0
    );
    p.cached_bytes()
}

/// Every object file in the store.
fn store_objects(env: &Env) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(env.store.join("objects")).expect("list objects/") {
        let dir = dir.expect("list objects/").path();
        for f in std::fs::read_dir(&dir).expect("list a fan-out dir") {
            out.push(f.expect("list a fan-out dir").path());
        }
    }
    out
}

/// Bytes of `files` in the page cache (`fincore`: mincore(2), which reads nothing in).
fn resident(files: &[PathBuf]) -> u64 {
    files
        .chunks(2000)
        .map(|chunk| {
            let out = run(crate::sys::cmd(
                "fincore",
                ["--bytes", "--noheadings", "--output", "RES"],
            )
            .args(chunk));
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The store's objects in the page cache after a cold `velo run true` and the read-ahead it
/// starts (once two looks a second apart agree).
fn objects_cached_after_true(env: &Env, tree: &Tree, objects: &[PathBuf]) -> u64 {
    drop_caches();
    run(&mut env.velo_run(&tree.velo_project, ["true"]));
    let mut last = resident(objects);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = resident(objects);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// (e) for one language.
pub fn cold_start(
    env: &Env,
    ext4: &LoopExt4,
    mountd: &Mountd,
    tree: &Tree,
    lang: Lang,
    cold_runs: usize,
    warm_runs: usize,
) -> Vec<Verdict> {
    println!(
        "\n(e) {}: access profiles — imports cold and warm, native against velo run",
        lang.name()
    );
    let profiles = record(env, tree, lang);
    let profile_cached = describe_profile(tree, "profile of the imports", &profiles.main);
    describe_profile(
        tree,
        &format!(
            "profile of another command ({})",
            lang.other_modules().join(", ")
        ),
        &profiles.other,
    );

    // Cold: every state and the local tree, rotating which goes first.
    let states = [
        None,
        Some(State::AsBefore),
        Some(State::FirstRun),
        Some(State::Profile),
        Some(State::Other),
    ];
    let mut sides: Vec<Side> = states
        .iter()
        .map(|s| Side::new(s.map_or("local disk (native)", State::label)))
        .collect();
    let mut whole: Vec<Series> = states
        .iter()
        .map(|s| Series::new(s.map_or("local disk (native)", State::label)))
        .collect();
    for round in 0..cold_runs {
        for k in 0..states.len() {
            let which = (round + k) % states.len();
            let mut c = match states[which] {
                None => {
                    let argv = lang.argv();
                    let mut c = env.command(&argv[0], &argv[1..]);
                    c.current_dir(&tree.disk_project);
                    c
                }
                Some(state) => {
                    profiles.set(state);
                    env.velo_run(&tree.velo_project, lang.argv())
                }
            };
            drop_caches();
            let before = sys::disk_reads(ext4.device_name()).0;
            let (d, out) = timed(&mut c);
            assert!(out.status.success(), "cold run failed");
            let reads = sys::disk_reads(ext4.device_name()).0 - before;
            sides[which].push(Sample::parse(&out), reads);
            whole[which].push(d);
            if let Some(state) = states[which] {
                profiles.after(state);
            }
        }
    }
    profiles.set(State::Profile);
    println!(
        "  cold (sync; echo 3 > /proc/sys/vm/drop_caches before every run), imports timed inside the process:"
    );
    import::print_sides(&sides.iter().collect::<Vec<_>>());
    println!(
        "  the same runs, whole processes (velo's mount and the runtime's start-up included):"
    );
    print_table(&whole.iter().collect::<Vec<_>>());

    // Warm: the profile in place (as every run after the first three).
    let mut warm = [
        Side::new("local disk (native)"),
        Side::new("velo run, profile"),
    ];
    for round in 0..=warm_runs {
        for k in 0..2 {
            let which = (round + k) % 2;
            let mut c = if which == 0 {
                let argv = lang.argv();
                let mut c = env.command(&argv[0], &argv[1..]);
                c.current_dir(&tree.disk_project);
                c
            } else {
                env.velo_run(&tree.velo_project, lang.argv())
            };
            let out = run(&mut c);
            if round > 0 {
                warm[which].push(Sample::parse(&out), 0);
            }
        }
    }
    println!("  warm:");
    import::print_sides(&[&warm[0], &warm[1]]);

    // Memory: the store's objects in the page cache after a cold `velo run true` (which
    // reads none), with and without the profile.
    let objects = store_objects(env);
    profiles.set(State::AsBefore);
    let without = objects_cached_after_true(env, tree, &objects);
    profiles.set(State::Profile);
    let with = objects_cached_after_true(env, tree, &objects);
    let read_ahead = with.saturating_sub(without);
    println!(
        "  the store's objects in the page cache after a cold `velo run true` (which reads \
         none of them): {:.1} MiB with the profile, {:.1} MiB as before: the read-ahead took \
         {:.1} MiB for a profile of {:.1} MiB",
        with as f64 / 1048576.0,
        without as f64 / 1048576.0,
        read_ahead as f64 / 1048576.0,
        profile_cached as f64 / 1048576.0
    );
    if let Some(entry) = mountd.image(&tree.image) {
        println!("  velo-mountd, this image: {entry}");
    }

    let m = |s: Option<State>| {
        let i = states.iter().position(|x| *x == s).expect("a state");
        sides[i].wall.median()
    };
    let name = lang.name();
    let verdicts = vec![
        Verdict::ratio(
            &format!("(e) {name} cold: velo run with its profile vs native"),
            m(Some(State::Profile)),
            m(None),
            COLD_TARGET,
            &format!(
                "as before profiles: {:.2}×",
                m(Some(State::AsBefore)) / m(None)
            ),
        ),
        Verdict::overhead(
            &format!("(e) {name} cold: first run (recording) vs as before"),
            m(Some(State::FirstRun)),
            m(Some(State::AsBefore)),
            MISS_TARGET_PCT,
            "no profile yet",
        ),
        Verdict::overhead(
            &format!("(e) {name} cold: another command's profile vs as before"),
            m(Some(State::Other)),
            m(Some(State::AsBefore)),
            MISS_TARGET_PCT,
            "a run that reads something else",
        ),
        Verdict::overhead(
            &format!("(e) {name} warm: velo run with its profile vs native"),
            warm[1].wall.median(),
            warm[0].wall.median(),
            WARM_TARGET_PCT,
            "",
        ),
        Verdict::ratio(
            &format!("(e) {name}: read-ahead memory / profile bytes"),
            read_ahead as f64,
            profile_cached as f64,
            MEMORY_TARGET,
            &format!("{:.1} MiB", read_ahead as f64 / 1048576.0),
        ),
    ];
    print_verdicts(&verdicts);
    verdicts
}

/// `velo run true` (warm, the image's overlay lent again) against `unshare -m true` (a
/// private mount namespace and nothing in it), alternating.
pub fn run_true(env: &Env, tree: &Tree, runs: usize) -> Vec<Verdict> {
    println!("\n(e) velo run true against unshare -m true (warm)");
    let mut velo = Series::new("velo run true");
    let mut unshare = Series::new("unshare -m true");
    for i in 0..=runs {
        let (a, _) = timed(&mut env.velo_run(&tree.velo_project, ["true"]));
        let (b, _) = timed(&mut env.command("unshare", ["-m", "true"]));
        if i > 0 {
            velo.push(a);
            unshare.push(b);
        }
    }
    print_table(&[&velo, &unshare]);
    let v = vec![Verdict::ratio(
        "(e) velo run true vs unshare -m true",
        velo.median(),
        unshare.median(),
        2.0,
        "",
    )];
    print_verdicts(&v);
    v
}
