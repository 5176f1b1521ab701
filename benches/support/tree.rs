//! A synthetic tree shaped like a big `node_modules`, identical on every run for a given seed:
//! package dirs (some under `@scope/`), a few levels of subdirs each, lognormal file sizes,
//! a fixed fraction of files that repeat an earlier file's content, `.bin/` symlinks, and
//! fixed mtimes so that the same seed gives the same velo image digest.

use std::collections::BTreeSet;
use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Files of at most this many bytes are stored inside the composefs image, not as objects.
pub const INLINE_MAX: u64 = 64;

/// The mtime (and atime) every entry gets: 2023-11-14T22:13:20Z.
const FIXED_TIME_SECS: u64 = 1_700_000_000;

/// Subdirectory names a package may have (each used at most once per package).
const SUBDIRS: [&str; 12] = [
    "lib", "dist", "src", "types", "esm", "cjs", "utils", "internal", "helpers", "test", "docs",
    "locale",
];
/// File name stems and extensions, combined with a per-package counter to stay unique.
const STEMS: [&str; 10] = [
    "index", "utils", "parse", "core", "types", "compat", "browser", "node", "main", "helpers",
];
const EXTS: [&str; 8] = ["js", "js", "js", "d.ts", "mjs", "cjs", "js.map", "md"];
/// Syllables for package and scope names.
const SYLLABLES: [&str; 16] = [
    "lo", "da", "sh", "re", "act", "ba", "bel", "we", "pack", "ts", "es", "lint", "mi", "cro",
    "vi", "te",
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct TreeSpec {
    /// Seed of every random choice: same seed, same tree.
    pub seed: u64,
    /// Package directories (each with a `package.json`).
    pub packages: usize,
    /// Regular files in total.
    pub files: usize,
    /// Fraction of files whose content repeats an earlier file's.
    pub duplicate_fraction: f64,
    /// Median file size in bytes (sizes are lognormal).
    pub median_size: f64,
    /// Sigma of the underlying normal distribution of ln(size).
    pub size_sigma: f64,
    /// Largest file size in bytes.
    pub max_size: u64,
    /// Fraction of packages under an `@scope/` directory.
    pub scoped_fraction: f64,
    /// Number of distinct scopes.
    pub scopes: usize,
    /// Fraction of packages with an executable `bin/cli.js` linked from `.bin/`.
    pub bin_fraction: f64,
}

impl TreeSpec {
    /// ≈ a big `node_modules`: 40k files in 1500 packages, 30% duplicate files.
    pub fn node_modules() -> Self {
        Self {
            seed: 0x7e10_21f7,
            packages: 1500,
            files: 40_000,
            duplicate_fraction: 0.30,
            median_size: 1536.0,
            size_sigma: 1.8,
            max_size: 8 << 20,
            scoped_fraction: 0.12,
            scopes: 40,
            bin_fraction: 0.15,
        }
    }
}

/// What was generated, with the figures a content-addressed store should reproduce.
#[derive(Debug, Clone, Default)]
pub struct TreeStats {
    /// Regular files.
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Package directories.
    pub packages: u64,
    /// Bytes of all regular files.
    pub bytes: u64,
    /// Files whose content repeats an earlier file's.
    pub duplicate_files: u64,
    /// Distinct contents larger than [`INLINE_MAX`] (what should become store objects).
    pub object_contents: u64,
    /// Their bytes.
    pub object_bytes: u64,
}

/// A small deterministic PRNG (SplitMix64) with the few distributions the generator needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]: ln is finite
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Lognormal with the given median and sigma.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// One distinct file content: regenerated from its seed whenever a file uses it.
#[derive(Debug, Clone, Copy)]
struct Content {
    seed: u64,
    len: u64,
}

/// One regular file of the plan.
#[derive(Debug)]
struct PlannedFile {
    rel: PathBuf,
    content: usize,
    mode: u32,
}

/// The whole tree, decided before anything is written.
#[derive(Debug, Default)]
struct Plan {
    dirs: BTreeSet<PathBuf>,
    files: Vec<PlannedFile>,
    symlinks: Vec<(PathBuf, PathBuf)>,
    contents: Vec<Content>,
    duplicates: u64,
    packages: u64,
}

/// Writes the tree described by `spec` at `root` (which must not exist yet).
pub fn generate(spec: &TreeSpec, root: &Path) -> TreeStats {
    let plan = plan(spec);
    write(&plan, root, spec.max_size);
    stats(&plan)
}

/// Decides every path, mode and content.
fn plan(spec: &TreeSpec) -> Plan {
    let mut rng = Rng::new(spec.seed);
    let mut plan = Plan::default();
    let packages: Vec<(PathBuf, bool)> = (0..spec.packages)
        .map(|i| {
            (
                package_path(&mut rng, spec, i),
                rng.chance(spec.bin_fraction),
            )
        })
        .collect();
    let fixed: usize = packages.iter().map(|(_, bin)| 1 + usize::from(*bin)).sum();
    let extra = spread(&mut rng, spec.files.saturating_sub(fixed), packages.len());
    for ((path, bin), extra) in packages.iter().zip(extra) {
        plan_package(&mut rng, spec, &mut plan, path, *bin, extra);
    }
    plan.packages = packages.len() as u64;
    plan
}

/// `name-i` or `@scope/name-i`: unique by the index.
fn package_path(rng: &mut Rng, spec: &TreeSpec, index: usize) -> PathBuf {
    let name = format!("{}{}-{index}", syllable(rng), syllable(rng));
    if rng.chance(spec.scoped_fraction) {
        let scope = rng.below(spec.scopes);
        PathBuf::from(format!("@{}{scope}", SYLLABLES[scope % SYLLABLES.len()])).join(name)
    } else {
        PathBuf::from(name)
    }
}

fn syllable(rng: &mut Rng) -> &'static str {
    SYLLABLES[rng.below(SYLLABLES.len())]
}

/// Splits `total` items over `bins` bins with lognormal weights (a few big packages, many small).
fn spread(rng: &mut Rng, total: usize, bins: usize) -> Vec<usize> {
    let mut cumulative = Vec::with_capacity(bins);
    let mut sum = 0.0;
    for _ in 0..bins {
        sum += rng.lognormal(1.0, 1.2);
        cumulative.push(sum);
    }
    let mut counts = vec![0; bins];
    for _ in 0..total {
        let x = rng.unit() * sum;
        let bin = cumulative.partition_point(|&c| c <= x).min(bins - 1);
        counts[bin] += 1;
    }
    counts
}

/// One package: `package.json`, an optional `bin/cli.js` + `.bin` link, and `extra` files
/// spread over a few nested subdirectories.
fn plan_package(
    rng: &mut Rng,
    spec: &TreeSpec,
    plan: &mut Plan,
    pkg: &Path,
    bin: bool,
    extra: usize,
) {
    add_dir_and_parents(plan, pkg);
    add_file(rng, spec, plan, pkg.join("package.json"), 0o644);
    if bin {
        let cli = pkg.join("bin/cli.js");
        add_dir_and_parents(plan, &pkg.join("bin"));
        add_file(rng, spec, plan, cli.clone(), 0o755);
        let name = pkg.file_name().expect("package path has a name");
        add_dir_and_parents(plan, Path::new(".bin"));
        plan.symlinks
            .push((Path::new(".bin").join(name), Path::new("..").join(cli)));
    }
    let dirs = package_dirs(rng, pkg, extra);
    for d in &dirs {
        add_dir_and_parents(plan, d);
    }
    for n in 0..extra {
        let dir = &dirs[rng.below(dirs.len())];
        let name = format!(
            "{}-{n}.{}",
            STEMS[rng.below(STEMS.len())],
            EXTS[rng.below(EXTS.len())]
        );
        add_file(rng, spec, plan, dir.join(name), 0o644);
    }
}

/// The package root plus up to `SUBDIRS.len()` subdirs, each under a random earlier one.
fn package_dirs(rng: &mut Rng, pkg: &Path, files: usize) -> Vec<PathBuf> {
    let count = 1 + (files / 6).min(SUBDIRS.len());
    let mut dirs = vec![pkg.to_path_buf()];
    for name in SUBDIRS.iter().take(count - 1) {
        let parent = dirs[rng.below(dirs.len())].clone();
        dirs.push(parent.join(name));
    }
    dirs
}

fn add_dir_and_parents(plan: &mut Plan, dir: &Path) {
    for d in dir.ancestors() {
        if !d.as_os_str().is_empty() {
            plan.dirs.insert(d.to_path_buf());
        }
    }
}

/// Adds a file with fresh content, or (with the duplicate probability) an earlier file's content.
fn add_file(rng: &mut Rng, spec: &TreeSpec, plan: &mut Plan, rel: PathBuf, mode: u32) {
    let content = if !plan.contents.is_empty() && rng.chance(spec.duplicate_fraction) {
        plan.duplicates += 1;
        rng.below(plan.contents.len())
    } else {
        let len = rng
            .lognormal(spec.median_size, spec.size_sigma)
            .round()
            .clamp(1.0, spec.max_size as f64) as u64;
        plan.contents.push(Content {
            seed: rng.next_u64(),
            len,
        });
        plan.contents.len() - 1
    };
    plan.files.push(PlannedFile { rel, content, mode });
}

/// Creates dirs, files and symlinks, then pins every timestamp.
fn write(plan: &Plan, root: &Path, max_size: u64) {
    let times = fixed_times();
    create_dir(root);
    for d in &plan.dirs {
        create_dir(&root.join(d));
    }
    let mut buf = vec![0u8; max_size as usize];
    for f in &plan.files {
        let c = plan.contents[f.content];
        let data = &mut buf[..c.len as usize];
        Rng::new(c.seed).fill(data);
        write_file(&root.join(&f.rel), data, f.mode, times);
    }
    for (link, target) in &plan.symlinks {
        let path = root.join(link);
        symlink(target, &path).expect("create symlink in the bench tree");
        set_symlink_times(&path);
    }
    // Last, deepest first: nothing is created in a directory after its times are set.
    for d in plan.dirs.iter().rev() {
        set_times(&root.join(d), times);
    }
    set_times(root, times);
}

fn fixed_times() -> FileTimes {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(FIXED_TIME_SECS);
    FileTimes::new().set_accessed(t).set_modified(t)
}

fn create_dir(path: &Path) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn write_file(path: &Path, data: &[u8], mode: u32, times: FileTimes) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.set_permissions(fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    f.set_times(times)
        .unwrap_or_else(|e| panic!("set times of {}: {e}", path.display()));
}

fn set_times(path: &Path, times: FileTimes) {
    File::open(path)
        .and_then(|f| f.set_times(times))
        .unwrap_or_else(|e| panic!("set times of {}: {e}", path.display()));
}

/// `lutimes`: std has no way to set a symlink's own times.
fn set_symlink_times(path: &Path) {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let t = Timespec {
        tv_sec: FIXED_TIME_SECS as i64,
        tv_nsec: 0,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    utimensat(CWD, path, &ts, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("set times of symlink {}: {e}", path.display()));
}

fn stats(plan: &Plan) -> TreeStats {
    let objects = plan.contents.iter().filter(|c| c.len > INLINE_MAX);
    TreeStats {
        files: plan.files.len() as u64,
        dirs: plan.dirs.len() as u64 + 1,
        symlinks: plan.symlinks.len() as u64,
        packages: plan.packages,
        bytes: plan
            .files
            .iter()
            .map(|f| plan.contents[f.content].len)
            .sum(),
        duplicate_files: plan.duplicates,
        object_contents: objects.clone().count() as u64,
        object_bytes: objects.map(|c| c.len).sum(),
    }
}
