//! Hostile store files and inputs (issue 12, items 6–8): a FIFO (or another special file) where
//! the store keeps a file hangs no command; an export whose header claims more than it holds,
//! or a store file far larger than any velo writes, is refused without velo allocating what it
//! claims; a failed write leaves no `tmp/write-*` file, and `velo gc` reclaims those a killed
//! process left.
//!
//! Every command runs under a watchdog: a child still running at its deadline is killed and
//! counts as a hang (the deadline is a limit, never a sleep that decides a result). Peak memory
//! is the child's own `ru_maxrss`, from `wait4`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(unsafe_code)] // wait4(2) for the child's peak memory, kill(2)

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, can_mount, is_mount_point, path_str};

/// How long any command may take on these tiny stores before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(60);

/// How a watched child ended.
struct Finished {
    /// Exit status (`None`: killed at the deadline).
    success: Option<bool>,
    stdout: String,
    stderr: String,
    /// Its peak resident memory, in bytes.
    peak_rss: u64,
}

impl Finished {
    fn hung(&self) -> bool {
        self.success.is_none()
    }
}

/// Runs `cmd` to completion or until `deadline`, when it is killed (and reported as hung).
fn watched(mut cmd: Command, deadline: Duration) -> Finished {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A hook makes std fork the child instead of vfork-ing it: a vfork child's peak memory
    // (`ru_maxrss`) starts from this process's own past peak, a forked one's from what this
    // process holds now (a few MB: the tests here never hold a large buffer).
    // SAFETY: the hook does nothing, so it is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| Ok(()));
    }
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let _kill = common::KillOnDrop(pid);
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let started = Instant::now();
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4 for this child (ours, not yet reaped).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut hung = false;
    loop {
        // SAFETY: wait4 on our own child's pid with valid pointers to locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if started.elapsed() > deadline {
            hung = true;
            // SAFETY: kill(2) of our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; blocks until the killed child is reaped.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::mem::forget(_kill); // reaped: its pid may be reused
    std::mem::forget(child); // reaped by wait4 above
    Finished {
        success: (!hung).then(|| libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        peak_rss: usage.ru_maxrss as u64 * 1024,
    }
}

fn mkfifo(path: &Path) {
    if let Ok(md) = fs::symlink_metadata(path) {
        if md.is_dir() {
            fs::remove_dir_all(path).unwrap();
        } else {
            fs::remove_file(path).unwrap();
        }
    }
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

fn is_fifo(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The object file holding `len` bytes (the test trees give each file a size of its own).
fn object_of_size(env: &Env, len: u64) -> PathBuf {
    common::walkdir(&env.store.join("objects"))
        .into_iter()
        .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() == len))
        .unwrap_or_else(|| panic!("no object of {len} bytes"))
}

/// A tree with two objects (8000 and 16000 bytes), snapshotted as `r`; its image digest.
fn store_with_snapshot(env: &Env) -> (PathBuf, String) {
    let src = env.path("src");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("lib/a.js"), "srca".repeat(2_000)).unwrap();
    fs::write(src.join("lib/b.js"), "srcb".repeat(4_000)).unwrap();
    let digest = env.snapshot(&src, "r");
    (src, digest)
}

/// Unmounts `target` at the end of a test (by the kernel, not by velo), even on failure.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while is_mount_point(&self.0) {
            let ok = Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                break;
            }
        }
    }
}

/// Where a FIFO is put, and whether `velo fsck` must name it.
struct Place {
    name: &'static str,
    /// The FIFO's path, given the store, the image digest and the tree.
    path: fn(&Env, &str) -> PathBuf,
    fsck_names_it: bool,
}

const PLACES: &[Place] = &[
    Place {
        name: "an object",
        path: |env, _| object_of_size(env, 8_000),
        fsck_names_it: true,
    },
    Place {
        name: "an image",
        path: |env, digest| env.store.join("images").join(digest),
        fsck_names_it: true,
    },
    Place {
        name: "a ref",
        path: |env, _| env.store.join("refs/fifo"),
        fsck_names_it: true,
    },
    Place {
        name: "a ref's history",
        path: |env, _| env.store.join("history/r"),
        fsck_names_it: true,
    },
    Place {
        name: "a ref's last use",
        path: |env, _| env.store.join("usage/r"),
        fsck_names_it: true,
    },
    Place {
        name: "meta.json",
        path: |env, _| env.store.join("meta.json"),
        fsck_names_it: false,
    },
    Place {
        name: "the store lock",
        path: |env, _| env.store.join("lock"),
        // flock works on a FIFO as on a file: velo only locks it, never reads it.
        fsck_names_it: false,
    },
    Place {
        name: "a mount record (pin)",
        path: |env, _| env.store.join("mounts/m-1-1-0/record.json"),
        fsck_names_it: true,
    },
    Place {
        name: "a tenant's meta.json",
        path: |env, _| env.store.join("tenants/t/meta.json"),
        fsck_names_it: true,
    },
    Place {
        name: "the image-check cache entry",
        path: |env, digest| {
            env.store
                .join("cache")
                .join(format!("image-checked-{digest}"))
        },
        fsck_names_it: true,
    },
    Place {
        name: "a user's quota ledger",
        path: |env, _| env.store.join("cache/quota-65534.json"),
        fsck_names_it: true,
    },
    Place {
        name: "a writer marker",
        path: |env, _| env.store.join("tmp/writer-1-1-0.json"),
        fsck_names_it: true,
    },
    Place {
        name: "a staging write",
        path: |env, _| env.store.join("tmp/write-1-1-0"),
        fsck_names_it: true,
    },
];

/// What one place did: lines describing every failure of the expectations (empty: all good).
fn check_place(place: &Place, mount: bool) -> Vec<String> {
    let env = Env::new();
    let (src, digest) = store_with_snapshot(&env);
    if place.name == "a tenant's meta.json" {
        env.ok(&["tenant", "create", "t", "--image", "r"]);
    }
    let object_b = object_of_size(&env, 16_000);
    let fifo = (place.path)(&env, &digest);
    mkfifo(&fifo);
    let fifo_s = path_str(&fifo).to_owned();
    let problems = std::cell::RefCell::new(Vec::new());
    let problem = |p: String| problems.borrow_mut().push(p);
    let run = |what: &str, args: &[&str]| -> Option<Finished> {
        let f = watched(env.velo(args), DEADLINE);
        if f.hung() {
            problem(format!(
                "{}: `velo {}` hung (killed after {DEADLINE:?})",
                place.name,
                args.join(" ")
            ));
            return None;
        }
        // A command that fails says why (fsck exits 1 for damage: it lists it on stdout).
        let said = format!("{}{}", f.stdout, f.stderr);
        if f.success == Some(false) && !(said.contains(&fifo_s) && said.contains("FIFO")) {
            problem(format!(
                "{}: `velo {what}` failed without naming {fifo_s} as a FIFO:\n{said}",
                place.name
            ));
        }
        Some(f)
    };
    let meta = place.name == "meta.json";

    run("ls", &["ls"]);
    if let Some(f) = run("fsck", &["--json", "fsck"])
        && place.fsck_names_it
        && !f.stdout.contains(&fifo_s)
    {
        problem(format!(
            "{}: `velo fsck` does not report {fifo_s}:\n{}{}",
            place.name, f.stdout, f.stderr
        ));
    }
    if let Some(f) = run("gc", &["gc"])
        && !meta
    {
        if f.success != Some(true) {
            problem(format!("{}: `velo gc` failed:\n{}", place.name, f.stderr));
        }
        // Nothing live may go because of the FIFO: the image (or the FIFO in its place) and
        // both objects stay.
        let image = env.store.join("images").join(&digest);
        if !image.exists() && !is_fifo(&image) {
            problem(format!("{}: gc removed the live image", place.name));
        }
        if !object_b.exists() {
            problem(format!("{}: gc removed a live object", place.name));
        }
    }
    if mount {
        let target = env.path("mnt");
        let _undo = Unmount(target.clone());
        if let Some(f) = run("mount", &["mount", "r", path_str(&target)])
            && f.success == Some(true)
        {
            match fs::read_to_string(target.join("lib/b.js")) {
                Ok(text) if text == "srcb".repeat(4_000) => {}
                other => problem(format!("{}: the mount reads {other:?}", place.name)),
            }
            // Lazily: the places' threads fork commands all the while, and a fork taken while
            // this thread had `lib/b.js` open holds that file until its exec — a moment's EBUSY
            // that has nothing to do with a FIFO.
            run("umount", &["umount", "--lazy", path_str(&target)]);
        }
        if is_mount_point(&target) {
            problem(format!("{}: left mounted", place.name));
        }
    }
    run("snapshot", &["snapshot", path_str(&src), "--ref", "r2"]);
    if let Some(f) = run("fsck --repair", &["fsck", "--repair"])
        && !meta
        && place.fsck_names_it
        && is_fifo(&fifo)
    {
        problem(format!(
            "{}: `velo fsck --repair` left {fifo_s}:\n{}{}",
            place.name, f.stdout, f.stderr
        ));
    }
    problems.into_inner()
}

/// Item 6: a FIFO anywhere velo reads a store file hangs no command (`ls`, `fsck`, `gc`,
/// `mount`, `snapshot`, `fsck --repair`); a command that cannot go on names the FIFO; `fsck`
/// reports it and `--repair` removes it; `gc` removes nothing live because of it.
#[test]
fn a_fifo_anywhere_in_the_store_hangs_no_command() {
    let mount = can_mount("a_fifo_anywhere_in_the_store_hangs_no_command (its mount part)");
    // One thread per place: a hang costs the deadline once, not once per place.
    let problems: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = PLACES
            .iter()
            .map(|p| s.spawn(move || check_place(p, mount)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a place's thread panicked"))
            .collect()
    });
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

// ---- Item 8: sizes claimed and sizes read -------------------------------------------------------

/// A zstd frame of `data` (raw blocks) followed by `count` bytes `fill` (RLE blocks, 4 bytes
/// per 128 KiB): how a hostile export claims a huge image in a few KB. Written by hand so the
/// test needs no compressor, and shows what the file holds.
fn zstd_frame(data: &[u8], fill: u8, count: u64) -> Vec<u8> {
    const BLOCK: usize = 128 << 10;
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd]; // magic
    out.push(0x00); // frame header descriptor: no content size, no checksum, no dictionary
    out.push(7 << 3); // window descriptor: 2^(10+7) = 128 KiB
    let mut blocks: Vec<(u32, Vec<u8>)> = data
        .chunks(BLOCK)
        .map(|c| ((c.len() as u32) << 3, c.to_vec())) // raw block
        .collect();
    let mut left = count;
    while left > 0 {
        let n = left.min(BLOCK as u64) as u32;
        blocks.push(((n << 3) | (1 << 1), vec![fill])); // RLE block: n times `fill`
        left -= n as u64;
    }
    let last = blocks.len() - 1;
    for (i, (mut head, body)) in blocks.into_iter().enumerate() {
        if i == last {
            head |= 1;
        }
        out.extend_from_slice(&head.to_le_bytes()[..3]);
        out.extend_from_slice(&body);
    }
    out
}

/// An export file: magic, version, then one zstd frame of the header length, the header, any
/// `extra` bytes and `count` bytes `fill`.
fn export_file(header: &[u8], header_len: u64, extra: &[u8], fill: u8, count: u64) -> Vec<u8> {
    let mut inner = header_len.to_le_bytes().to_vec();
    inner.extend_from_slice(header);
    inner.extend_from_slice(extra);
    let mut out = b"VELO-EXPORT\n".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&zstd_frame(&inner, fill, count));
    out
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The most a refused input may cost: velo's own footprint with room to spare, and far below
/// any of the sizes claimed here.
const REFUSAL_BUDGET: u64 = 96 * MIB;

/// Imports `file` (`what` describes it) in a child process, which must be refused (naming the
/// file, and saying `why`) within the deadline, at a peak memory below [`REFUSAL_BUDGET`].
/// Prints the figure; returns what went wrong, if anything.
fn refused_import(env: &Env, file: &Path, what: &str, why: &str) -> Option<String> {
    let f = watched(env.velo(&["import", path_str(file)]), DEADLINE);
    let size = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let outcome = match f.success {
        None => "HUNG",
        Some(true) => "TAKEN",
        Some(false) => "refused",
    };
    println!(
        "hostile export ({what}, file {} KB): {outcome}, peak memory {} MB",
        size / 1000,
        f.peak_rss / 1_000_000
    );
    if f.success != Some(false) {
        return Some(format!("{what}: {outcome}\n{}{}", f.stdout, f.stderr));
    }
    if !f.stderr.contains(path_str(file)) || !f.stderr.contains(why) {
        return Some(format!(
            "{what}: the refusal does not name the file and say {why:?}:\n{}",
            f.stderr
        ));
    }
    (f.peak_rss >= REFUSAL_BUDGET).then(|| format!("{what}: peak memory {} bytes", f.peak_rss))
}

/// Item 8: an export whose header claims a 1 GiB image of which the file holds a few KB (zeros
/// compress to nothing), or a 512 MiB header, is refused without velo allocating the size
/// claimed; prints the figures.
#[test]
fn a_hostile_export_is_refused_without_allocating_what_it_claims() {
    let env = Env::new();
    let digest = "ab".repeat(32);

    // 1. The header claims a 1 GiB image; the file holds the header and 1 GiB of zeros as RLE.
    let header = format!(r#"{{"image":{{"digest":"{digest}","size":{GIB}}},"objects":[]}}"#);
    let bomb = env.path("image-bomb.velo");
    fs::write(
        &bomb,
        export_file(header.as_bytes(), header.len() as u64, &[], 0, GIB),
    )
    .unwrap();
    let mut problems = Vec::new();
    problems.extend(refused_import(
        &env,
        &bomb,
        "header claims 1 GiB",
        "does not start with the composefs magic number",
    ));

    // 2. A valid-looking composefs/EROFS first block that agrees with the claim, then zeros:
    // it passes every check the first block allows, and is refused when its bytes do not hash
    // to the digest claimed, without ever being held in memory.
    let mut first = vec![0u8; 4096];
    first[0..4].copy_from_slice(&0xd078629au32.to_le_bytes()); // composefs magic
    first[4..8].copy_from_slice(&1u32.to_le_bytes()); // EROFS format version
    first[12..16].copy_from_slice(&1u32.to_le_bytes()); // composefs version (V1)
    first[1024..1028].copy_from_slice(&0xe0f5e1e2u32.to_le_bytes()); // EROFS magic
    first[1024 + 12] = 12; // blkszbits
    first[1024 + 36..1024 + 40].copy_from_slice(&((GIB / 4096) as u32).to_le_bytes()); // blocks
    let forged = env.path("forged-superblock.velo");
    fs::write(
        &forged,
        export_file(
            header.as_bytes(),
            header.len() as u64,
            &first,
            0,
            GIB - 4096,
        ),
    )
    .unwrap();
    problems.extend(refused_import(
        &env,
        &forged,
        "forged superblock, header claims 1 GiB",
        "its bytes hash to",
    ));

    // 3. The same bytes under their own digest: they pass the digest check too, and are refused
    // by the parser, which reads the few pages it reaches (the image is parsed where it was
    // staged, not from memory).
    let mut h = velo_objects::verity::VerityHasher::new();
    h.update(&first);
    h.update_zeros(GIB - 4096);
    let own = h.finalize().to_hex();
    let header_own = format!(r#"{{"image":{{"digest":"{own}","size":{GIB}}},"objects":[]}}"#);
    let forged_own = env.path("forged-superblock-own-digest.velo");
    fs::write(
        &forged_own,
        export_file(
            header_own.as_bytes(),
            header_own.len() as u64,
            &first,
            0,
            GIB - 4096,
        ),
    )
    .unwrap();
    problems.extend(refused_import(
        &env,
        &forged_own,
        "forged superblock under its own digest, header claims 1 GiB",
        "does not parse",
    ));

    // 4. The header length claims 512 MiB - 1 of JSON: a real header, then spaces.
    let claim = 512 * MIB - 1;
    let padded = env.path("header-bomb.velo");
    fs::write(
        &padded,
        export_file(
            header.as_bytes(),
            claim,
            &[],
            b' ',
            claim - header.len() as u64,
        ),
    )
    .unwrap();
    problems.extend(refused_import(
        &env,
        &padded,
        "header length claims 512 MiB of JSON",
        "is corrupt",
    ));
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Item 8: a 200 MB `meta.json` (valid JSON, padded) is refused by `velo ls` with an error
/// naming it, without being read; prints the figure.
#[test]
fn a_huge_meta_json_is_refused_without_reading_it() {
    let env = Env::new();
    store_with_snapshot(&env);
    let meta = env.store.join("meta.json");
    {
        // Written in pieces: this process never holds 200 MB (see `watched`).
        use std::io::Write;
        let len = fs::metadata(&meta).unwrap().len();
        let mut f = fs::OpenOptions::new().append(true).open(&meta).unwrap();
        let spaces = vec![b' '; 1 << 20];
        let mut left = 200_000_000 - len;
        while left > 0 {
            let n = left.min(spaces.len() as u64) as usize;
            f.write_all(&spaces[..n]).unwrap();
            left -= n as u64;
        }
    }
    let f = watched(env.velo(&["ls"]), DEADLINE);
    println!(
        "velo ls with a 200 MB meta.json: {}, peak memory {} MB",
        match f.success {
            None => "HUNG",
            Some(true) => "TAKEN",
            Some(false) => "refused",
        },
        f.peak_rss / 1_000_000
    );
    assert_eq!(f.success, Some(false), "velo ls took it:\n{}", f.stdout);
    assert!(
        f.stderr.contains(path_str(&meta)) && f.stderr.contains("200000000 bytes"),
        "{}",
        f.stderr
    );
    assert!(
        f.peak_rss < REFUSAL_BUDGET,
        "peak memory {} bytes",
        f.peak_rss
    );
}

// ---- Item 7 (part): staging writes ---------------------------------------------------------------

fn write_leftovers(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store.join("tmp"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("write-"))
        .collect();
    v.sort();
    v
}

/// Item 7: a write of a small store file (a ref) that fails — here the store's filesystem is
/// full — leaves no `tmp/write-*` file behind.
#[test]
fn a_failed_write_leaves_no_staging_file() {
    if !can_mount("a_failed_write_leaves_no_staging_file (it needs a full tmpfs)") {
        return;
    }
    let env = Env::new();
    let _fs = common::Tmpfs::mount(&env.store, "velo-test-full", Some("4m,mode=700"));
    store_with_snapshot(&env);
    // Fill the filesystem: any new data block fails with ENOSPC (a new empty file does not).
    let filler = env.store.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![7u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    let err = env.fails(&["ref", "publish", "r"]);
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(
        write_leftovers(&env.store),
        Vec::<String>::new(),
        "the failed write left its staging file"
    );
}

/// Item 7: `velo gc` removes the `tmp/write-*` file a killed process left, and keeps one a live
/// process holds (flocked, as velo holds its own while writing).
#[test]
fn gc_removes_staging_files_of_dead_writers_only() {
    let env = Env::new();
    store_with_snapshot(&env);
    let dead = env.store.join("tmp/write-999999-1-0");
    fs::write(&dead, "half a ref").unwrap();
    let live = env.store.join("tmp/write-999998-1-0");
    fs::write(&live, "being written").unwrap();
    let held = fs::File::open(&live).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let r = env.json(&["gc"]);
    assert_eq!(
        write_leftovers(&env.store),
        vec!["write-999998-1-0".to_owned()],
        "gc: {r}"
    );
    drop(held);
    let r = env.json(&["gc"]);
    assert!(write_leftovers(&env.store).is_empty(), "gc: {r}");
}
