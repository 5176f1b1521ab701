//! The security suite of issue 11: what a second ordinary user (B) cannot do to velo-mountd,
//! to the store, to the host, or to another user (A). Every test runs the real service on a
//! temporary store with two real users; B acts through `velo` and through a hostile client
//! that speaks the raw protocol (`tests/support/raw_client.py`, run as B with no
//! capabilities), whose JSON reports the tests assert on.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use common::mountd::{Mountd, TestUser};
use common::{Env, can_mount, describe, listing, path_str};
use serde_json::{Value, json};

// --- users, commands, the hostile client ------------------------------------------------------

/// A Python every user may run (pyenv shims under /root are not theirs).
fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.exists() {
        system
    } else {
        PathBuf::from("python3")
    }
}

/// The hostile client, copied where every user can read it.
fn raw_client(env: &Env) -> PathBuf {
    let path = env.path("raw_client.py");
    fs::write(&path, include_str!("support/raw_client.py")).expect("write raw_client.py");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// `raw_client.py --socket S ARGS…` as `user`.
fn raw_command(user: &TestUser, mountd: &Mountd, env: &Env, args: &[&str]) -> Command {
    let mut c = user.command(&python(), &user.home);
    c.arg(env.path("raw_client.py"))
        .arg("--socket")
        .arg(&mountd.socket)
        .args(args);
    c
}

/// Runs the hostile client to the end; returns its JSON report.
fn raw(user: &TestUser, mountd: &Mountd, env: &Env, args: &[&str]) -> Value {
    let out = raw_command(user, mountd, env, args)
        .output()
        .expect("run raw_client.py");
    assert!(
        out.status.success(),
        "raw_client.py {args:?} failed:\n{}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("raw_client.py {args:?}: {e}: {text}"))
}

/// A client left running (it holds connections or mounts) while the test looks around; killed
/// on drop.
struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Held {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start raw_client.py");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// The next report that satisfies `pred` (others are passed to `seen`), within 60 s.
    fn until(&self, what: &str, pred: &dyn Fn(&Value) -> bool, seen: &mut Vec<Value>) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
                    if pred(&v) {
                        return v;
                    }
                    seen.push(v);
                }
                Err(RecvTimeoutError::Timeout) => panic!("{what}: no report within 60 s"),
                Err(RecvTimeoutError::Disconnected) => panic!("{what}: the client exited"),
            }
        }
    }

    /// Whether the client is still running.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes its stdin (it lets go and exits); returns the reports it printed meanwhile.
    fn finish(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => rest.push(serde_json::from_str(&line).unwrap_or(Value::Null)),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("the client did not exit"),
            }
        }
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "raw_client.py exited with {status}");
        rest
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn output(mut cmd: Command) -> Output {
    cmd.output().expect("run a command")
}

fn ok(cmd: Command, what: &str) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{what} failed:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_ok(cmd: Command, what: &str) -> Value {
    let text = ok(cmd, what);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

/// The error kind of a response, if it is an error.
fn kind(response: &Value) -> Option<&str> {
    response["error"]["kind"].as_str()
}

// --- trees, projects, the store ---------------------------------------------------------------

/// Deterministic bytes that do not compress or dedup.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..len).map(|_| (rng.next() >> 24) as u8).collect()
}

/// xorshift64: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A tree of `user`'s at `dir`: each (relative path, bytes).
fn tree_of(user: &TestUser, dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (rel, bytes) in files {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        fs::write(&p, bytes).expect("write");
    }
    user.own(dir);
}

const CUSTOM_TOML: &str = "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\n\
    inputs = [\"deps.lock\"]\n\
    install = \"mkdir -p deps/lib && id -u > deps/lib/built-by && cp deps.lock deps/lib/\"\n";

/// A project of `user`'s (in their home) whose install records who ran it.
fn project_of(user: &TestUser, name: &str) -> PathBuf {
    let project = user.home.join(name);
    fs::create_dir_all(&project).expect("mkdir");
    fs::write(project.join("deps.lock"), "v1\n").expect("write");
    fs::write(project.join("velo.toml"), CUSTOM_TOML).expect("write");
    user.own(&project);
    project
}

/// `velo run cat deps/lib/built-by` as `user`: their own tree, served through the service.
/// Returns how long it took.
fn run_as(user: &TestUser, mountd: &Mountd, project: &Path) -> Duration {
    let started = Instant::now();
    let out = ok(
        user.velo(mountd, project, &["run", "cat", "deps/lib/built-by"]),
        &format!("velo run as {}", user.name),
    );
    assert_eq!(out, format!("{}\n", user.uid), "{}'s run", user.name);
    started.elapsed()
}

/// `velo snapshot DIR --ref NAME --json` as `user`, through the service.
fn snapshot_as(user: &TestUser, mountd: &Mountd, dir: &Path, name: &str) -> Value {
    json_ok(
        user.velo(
            mountd,
            &user.home,
            &["--json", "snapshot", path_str(dir), "--ref", name],
        ),
        &format!("velo snapshot as {}", user.name),
    )
}

/// What the service says to `user` at hello (`velo service status --json` as them).
fn hello_as(user: &TestUser, mountd: &Mountd) -> Value {
    json_ok(
        user.velo(mountd, &user.home, &["--json", "service", "status"]),
        &format!("velo service status as {}", user.name),
    )
}

/// Every entry under the store's objects/, images/, refs/ and tmp/ — but the fan-out dirs
/// `objects/xx/` themselves: looking up whether an object is present creates its (empty)
/// fan-out dir, at most 256 of them, which hold nothing until an object is published.
fn stored(env: &Env) -> BTreeMap<PathBuf, (u64, u32, String)> {
    let mut all = BTreeMap::new();
    for area in ["objects", "images", "refs", "tmp"] {
        for (p, v) in listing(&env.store.join(area)) {
            let fanout = area == "objects"
                && p.components().count() == 1
                && v.1 & libc::S_IFMT == libc::S_IFDIR;
            if !fanout {
                all.insert(Path::new(area).join(p), v);
            }
        }
    }
    all
}

/// Asserts two listings are the same, naming what differs.
fn assert_same(
    before: &BTreeMap<PathBuf, (u64, u32, String)>,
    after: &BTreeMap<PathBuf, (u64, u32, String)>,
    what: &str,
) {
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        added.is_empty() && removed.is_empty() && changed.is_empty(),
        "{what}: the store changed: added {added:?}, removed {removed:?}, changed {changed:?}"
    );
}

/// A snapshot taken as root into a scratch store of the test's, laid out for the hostile
/// client (readable by everyone): `DIR/image` and `DIR/objects/<digest>`. Returns the image
/// digest and the objects' digests.
fn payload(env: &Env, tree: &Path, dir: &Path) -> (String, Vec<String>) {
    let name = dir.file_name().expect("a name").to_string_lossy();
    let scratch = env.path(&format!("scratch-{name}"));
    let out = Command::new(common::velo_bin())
        .arg("--store")
        .arg(&scratch)
        .args(["--json", "snapshot"])
        .arg(tree)
        .env_remove("VELO_STORE")
        .output()
        .expect("run velo");
    assert!(out.status.success(), "scratch snapshot: {}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("snapshot json");
    let digest = v["digest"].as_str().expect("digest").to_owned();
    fs::create_dir_all(dir.join("objects")).expect("mkdir");
    fs::copy(scratch.join("images").join(&digest), dir.join("image")).expect("copy image");
    let mut objects = Vec::new();
    for fan in fs::read_dir(scratch.join("objects"))
        .expect("objects")
        .flatten()
    {
        for o in fs::read_dir(fan.path()).expect("fan-out dir").flatten() {
            let name = format!(
                "{}{}",
                fan.file_name().to_string_lossy(),
                o.file_name().to_string_lossy()
            );
            fs::copy(o.path(), dir.join("objects").join(&name)).expect("copy object");
            objects.push(name);
        }
    }
    for p in std::iter::once(dir.to_owned()).chain(common::walkdir(dir)) {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    (digest, objects)
}

/// A payload (see [`payload`]) whose image claims one file of 2^64 - 256 bytes (its own
/// digest recomputed by the client): two files, the claimant owned by uid 100000 so that its
/// inode is an extended one (a 64-bit size field), patched in place.
fn huge_claim_payload(env: &Env) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let tree = env.path("claim-tree");
    fs::create_dir_all(&tree).expect("mkdir");
    fs::write(tree.join("claimant"), noise(91, 5000)).expect("write");
    fs::write(tree.join("other"), noise(92, 7000)).expect("write");
    std::os::unix::fs::chown(tree.join("claimant"), Some(100_000), Some(100_000)).expect("chown");
    let dir = env.path("payload-claim");
    payload(env, &tree, &dir);
    let mut image = fs::read(dir.join("image")).expect("image");
    let size = 5000u64.to_le_bytes();
    // An extended inode: i_format (bit 0 set), i_xattr_icount, i_mode (a regular file),
    // i_nb, then i_size.
    let at: Vec<usize> = (8..image.len().saturating_sub(8))
        .filter(|&i| {
            let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
            image[i..i + 8] == size
                && u16_at(i - 8) & 1 == 1
                && u32::from(u16_at(i - 4)) & libc::S_IFMT == libc::S_IFREG
        })
        .collect();
    assert_eq!(at.len(), 1, "the claimant's inode in the image: {at:?}");
    image[at[0]..at[0] + 8].copy_from_slice(&(u64::MAX - 255).to_le_bytes());
    fs::write(dir.join("image"), &image).expect("write");
    assert_eq!(
        fs::metadata(dir.join("image")).expect("stat").mode() & 0o777,
        0o644
    );
    dir
}

/// The pid of the process serving `mountd`'s socket (`SO_PEERCRED`).
fn service_pid(mountd: &Mountd) -> i32 {
    let s = std::os::unix::net::UnixStream::connect(&mountd.socket).expect("connect");
    rustix::net::sockopt::socket_peercred(&s)
        .expect("SO_PEERCRED")
        .pid
        .as_raw_nonzero()
        .get()
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|rest| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z')
    })
}

/// Asserts the service `pid` still runs and answers root's status.
fn still_serving(mountd: &Mountd, pid: i32) {
    assert!(alive(pid), "velo-mountd (pid {pid}) is gone");
    assert_eq!(mountd.status()["running"], true);
    assert_eq!(service_pid(mountd), pid, "the same service answers");
}

/// Lines of this process's mount table (the host's) showing a mount of one of the test
/// store's images, or anything under the test's directory.
fn host_mounts_of(env: &Env) -> Vec<String> {
    let images: Vec<String> = fs::read_dir(env.store.join("images"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter(|l| {
            l.contains(path_str(env.dir.path()))
                || images.iter().any(|d| l.contains(&format!("velo:{d}")))
        })
        .map(str::to_owned)
        .collect()
}

/// The store's tenant dirs whose name starts with `prefix`.
fn tenants(env: &Env, prefix: &str) -> Vec<String> {
    fs::read_dir(env.store.join("tenants"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

// --- 1. private refs and persisted uppers -----------------------------------------------------

/// B cannot see, resolve, mount or borrow the objects of A's refs, nor reach A's persisted
/// upper: refs live in per-user namespaces the service prefixes itself, objects only count as
/// sent for images the caller may read, and a persist id names a tenant of the caller's own.
#[test]
fn b_cannot_mount_or_read_a_private_refs_or_persisted_uppers() {
    if !can_mount("b_cannot_mount_or_read_a_private_refs_or_persisted_uppers") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    raw_client(&env);
    let a = TestUser::create("s1a", env.dir.path());
    let b = TestUser::create("s1b", env.dir.path());

    // A's private snapshot.
    let a_tree = a.home.join("tree");
    tree_of(
        &a,
        &a_tree,
        &[
            ("secret.txt", b"A's secret\n".to_vec()),
            ("blob.bin", noise(11, 5000)),
        ],
    );
    let secret = snapshot_as(&a, &mountd, &a_tree, "secret");
    let secret_image = secret["digest"].as_str().expect("digest").to_owned();

    // B's listings do not show it.
    let ls = json_ok(b.velo(&mountd, &b.home, &["--json", "ls"]), "velo ls as B");
    let refs = json_ok(
        b.velo(&mountd, &b.home, &["--json", "ref", "ls"]),
        "velo ref ls as B",
    );
    for shown in [&ls["refs"], &refs] {
        assert_eq!(
            shown.as_array().map(Vec::len),
            Some(0),
            "B sees refs: {shown}"
        );
    }
    assert!(!ls.to_string().contains(&secret_image), "{ls}");

    // Nor does the raw protocol, under A's name or the stored one.
    let a_stored = format!("users/{}/secret", a.uid);
    let asked = raw(
        &b,
        &mountd,
        &env,
        &[
            "ask",
            r#""refs""#,
            r#"{"resolve":{"name":"secret","summary":true}}"#,
            &json!({"resolve": {"name": a_stored}}).to_string(),
            r#"{"mount":{"name":"secret","writes":"read-only"}}"#,
            r#"{"mount":{"name":"secret","writes":"discard"}}"#,
            r#"{"mount":{"name":"secret","writes":{"persist":"x"}}}"#,
            &json!({"mount": {"name": a_stored, "writes": "read-only"}}).to_string(),
        ],
    );
    let r = asked["responses"].as_array().expect("responses");
    assert_eq!(r.len(), 7, "{asked}");
    assert_eq!(r[0]["refs"]["refs"], json!([]), "{asked}");
    assert_eq!(r[1]["resolved"]["image"], Value::Null, "{asked}");
    assert_eq!(r[2]["resolved"]["image"], Value::Null, "{asked}");
    for m in &r[3..] {
        assert_eq!(kind(m), Some("not-found"), "B mounted A's ref: {asked}");
    }
    assert_eq!(asked["fds"], 0, "no mount fd reached B: {asked}");

    // Knowing A's image bytes does not give B A's objects: the service asks for every one.
    let stolen = env.path("a-image");
    fs::copy(env.store.join("images").join(&secret_image), &stolen).expect("copy");
    fs::set_permissions(&stolen, fs::Permissions::from_mode(0o644)).expect("chmod");
    let imp = raw(
        &b,
        &mountd,
        &env,
        &["import", "--image", path_str(&stolen), "--name", "stolen"],
    );
    assert_eq!(
        imp["need"].as_array().map(Vec::len),
        Some(1),
        "B must send the object A's image holds (the store has it): {imp}"
    );
    assert_eq!(kind(&imp["responses"][1]), Some("corrupt"), "{imp}");
    assert!(
        !env.store.join(format!("refs/users/{}", b.uid)).exists(),
        "B got a ref without sending the bytes"
    );

    // A's run keeps its writes in a persisted upper.
    let project = project_of(&a, "proj");
    ok(
        a.velo(
            &mountd,
            &project,
            &[
                "run",
                "--persist",
                "sh",
                "-c",
                "echo a-secret > deps/persisted-by-a",
            ],
        ),
        "A's persisted run",
    );
    let a_prefix = format!("u{}-", a.uid);
    let a_tenants = tenants(&env, &a_prefix);
    assert_eq!(a_tenants.len(), 1, "A's persisted upper: {a_tenants:?}");
    let persist_id = a_tenants[0][a_prefix.len()..].to_owned();
    let a_upper = env.store.join("tenants").join(&a_tenants[0]).join("upper");
    assert_eq!(
        fs::read_to_string(a_upper.join("persisted-by-a"))
            .ok()
            .as_deref(),
        Some("a-secret\n")
    );
    let status = json_ok(
        a.velo(&mountd, &project, &["--json", "status"]),
        "A's status",
    );
    let a_ref = status[0]["ref"].as_str().expect("ref").to_owned();

    // B names A's ref and A's persist id: not found; the id means B's own (empty) upper.
    let b_tree = b.home.join("tree");
    tree_of(&b, &b_tree, &[("mine.txt", b"B's\n".to_vec())]);
    snapshot_as(&b, &mountd, &b_tree, "mine");
    let asked = raw(
        &b,
        &mountd,
        &env,
        &[
            "ask",
            &json!({"resolve": {"name": a_ref}}).to_string(),
            &json!({"mount": {"name": a_ref, "writes": {"persist": persist_id}}}).to_string(),
            &json!({"resolve": {"name": "mine", "persist": persist_id}}).to_string(),
        ],
    );
    let r = &asked["responses"];
    assert_eq!(r[0]["resolved"]["image"], Value::Null, "{asked}");
    assert_eq!(kind(&r[1]), Some("not-found"), "{asked}");
    assert_eq!(
        r[2]["resolved"]["persisted_bytes"],
        Value::Null,
        "B sees the size of A's upper: {asked}"
    );
    let mounted = raw(
        &b,
        &mountd,
        &env,
        &[
            "mount",
            "mine",
            "--writes",
            &format!("persist:{persist_id}"),
            "--target",
            path_str(&b.home.join("mnt")),
            "--read",
            "persisted-by-a",
            "--write",
            "written-by-b",
        ],
    );
    assert_eq!(
        mounted["response"]["mounted"]["persisted"], true,
        "{mounted}"
    );
    let names: Vec<&str> = mounted["listing"]
        .as_array()
        .expect("listing")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert_eq!(names, ["mine.txt"], "B's persisted mount shows: {mounted}");
    assert_eq!(
        mounted["read"]["persisted-by-a"]["error"], "ENOENT",
        "{mounted}"
    );
    assert_eq!(mounted["written"], json!(["written-by-b"]), "{mounted}");
    let b_upper = env
        .store
        .join("tenants")
        .join(format!("u{}-{persist_id}", b.uid))
        .join("upper");
    assert!(b_upper.join("written-by-b").exists(), "B's write is B's");
    assert_eq!(
        fs::read_dir(&a_upper)
            .expect("A's upper")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        ["persisted-by-a"],
        "A's upper is untouched"
    );

    // B's `velo run --persist` of the very same project builds B's own tree.
    let out = ok(
        b.velo(
            &mountd,
            &project,
            &[
                "run",
                "--persist",
                "sh",
                "-c",
                "cat deps/lib/built-by; ls -A deps",
            ],
        ),
        "B's run of A's project",
    );
    assert_eq!(out, format!("{}\nlib\n", b.uid), "B got A's tree or writes");

    // And B cannot open the store itself.
    let mut ls = b.command(Path::new("/bin/ls"), &b.home);
    ls.arg(&env.store);
    let out = output(ls);
    assert!(
        !out.status.success(),
        "B lists the store: {}",
        describe(&out)
    );
    run_as(&a, &mountd, &project);
}

// --- 2. lying, truncated and hostile imports --------------------------------------------------

/// B's imports that lie about their image, stop half-way, carry wrong object bytes or an
/// image velo's reader does not take are refused as corrupt, leave no byte in the store, and
/// the service goes on serving A; the same payload sent honestly is taken (so each refusal is
/// for the reason it names).
#[test]
fn b_cannot_import_a_lying_truncated_or_hostile_stream() {
    if !can_mount("b_cannot_import_a_lying_truncated_or_hostile_stream") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let pid = service_pid(&mountd);
    raw_client(&env);
    let a = TestUser::create("s2a", env.dir.path());
    let b = TestUser::create("s2b", env.dir.path());
    let project = project_of(&a, "proj");
    run_as(&a, &mountd, &project);

    // A tree with three objects, and another whose image digest B will claim.
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("d")).expect("mkdir");
    fs::write(tree.join("a.bin"), noise(21, 70_000)).expect("write");
    fs::write(tree.join("d/b.bin"), noise(22, 5000)).expect("write");
    fs::write(tree.join("d/c.bin"), noise(23, 200)).expect("write");
    fs::write(tree.join("small"), "inline\n").expect("write");
    let good = env.path("payload-good");
    let (digest, objects) = payload(&env, &tree, &good);
    assert_eq!(objects.len(), 3, "{objects:?}");
    let other_tree = env.path("other-tree");
    fs::create_dir_all(&other_tree).expect("mkdir");
    fs::write(other_tree.join("x"), noise(24, 3000)).expect("write");
    let (other_digest, _) = payload(&env, &other_tree, &env.path("payload-other"));
    assert_ne!(digest, other_digest);

    // The same objects, each with one byte flipped.
    let bad = env.path("payload-bad-objects");
    fs::create_dir_all(&bad).expect("mkdir");
    for o in &objects {
        let mut bytes = fs::read(good.join("objects").join(o)).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(bad.join(o), bytes).expect("write");
    }
    for p in std::iter::once(bad.clone()).chain(common::walkdir(&bad)) {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    // Hostile images, each with the correct fs-verity digest of its bytes.
    let image = fs::read(good.join("image")).expect("image");
    let hostile_dir = env.path("hostile");
    fs::create_dir_all(&hostile_dir).expect("mkdir");
    let mut hostile = vec![
        ("random bytes", hostile_dir.join("random.img")),
        ("half of a velo image", hostile_dir.join("half.img")),
    ];
    fs::write(&hostile[0].1, noise(25, 40_000)).expect("write");
    fs::write(&hostile[1].1, &image[..image.len() / 2]).expect("write");
    let erofs_src = env.path("erofs-src");
    fs::create_dir_all(erofs_src.join("sub")).expect("mkdir");
    fs::write(erofs_src.join("sub/file"), noise(26, 9000)).expect("write");
    let mkfs = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(hostile_dir.join("mkfs.img"))
        .arg(&erofs_src)
        .output();
    match mkfs {
        Ok(out) if out.status.success() => {
            hostile.push(("an image made by mkfs.erofs", hostile_dir.join("mkfs.img")))
        }
        _ => eprintln!(
            "b_cannot_import_a_lying_truncated_or_hostile_stream: mkfs.erofs is not installed \
             (scripts/install-deps installs erofs-utils); skipping that image"
        ),
    }
    for (_, p) in &hostile {
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    let image_path = good.join("image");
    let good_objects = good.join("objects");
    let image_arg = path_str(&image_path).to_owned();
    let objects_arg = path_str(&good_objects).to_owned();
    let half = (image.len() / 2).to_string();
    let mut cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            "an image claiming another image's digest".into(),
            vec![
                "--image".into(),
                image_arg.clone(),
                "--digest".into(),
                other_digest.clone(),
                "--objects".into(),
                objects_arg.clone(),
            ],
            "hash to",
        ),
        (
            "a stream closed in the middle of the image".into(),
            vec![
                "--image".into(),
                image_arg.clone(),
                "--cut-image".into(),
                half,
            ],
            "ended after",
        ),
        (
            "a stream closed in the middle of an object".into(),
            vec![
                "--image".into(),
                image_arg.clone(),
                "--objects".into(),
                objects_arg.clone(),
                "--cut-object".into(),
                "1000".into(),
            ],
            "object",
        ),
        (
            "objects whose bytes are wrong".into(),
            vec![
                "--image".into(),
                image_arg.clone(),
                "--objects".into(),
                path_str(&bad).to_owned(),
            ],
            "object",
        ),
    ];
    for (what, p) in &hostile {
        cases.push((
            format!("a hostile image: {what}"),
            vec!["--image".into(), path_str(p).to_owned()],
            "does not parse",
        ));
    }
    // One that parses, and claims a file of 2^64 - 256 bytes: what the import would add is
    // summed without overflowing, and the bytes never come.
    let claim = huge_claim_payload(&env);
    cases.push((
        "an image claiming a file of 2^64 - 256 bytes".into(),
        vec!["--image".into(), path_str(&claim.join("image")).to_owned()],
        "object",
    ));

    let before = stored(&env);
    for (what, args, says) in &cases {
        let mut argv = vec!["import", "--name", "evil"];
        argv.extend(args.iter().map(String::as_str));
        let r = raw(&b, &mountd, &env, &argv);
        let last = r["responses"]
            .as_array()
            .and_then(|v| v.last())
            .cloned()
            .unwrap_or(Value::Null);
        assert!(
            matches!(kind(&last), Some("corrupt" | "bad-request")),
            "{what}: not refused: {r}"
        );
        let message = last["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message:?} lacks {says:?}");
        if what.contains("wrong") {
            let named = objects.iter().any(|o| message.contains(o.as_str()));
            assert!(named, "{what}: the refusal names the object: {message}");
        }
        assert_same(&before, &stored(&env), what);
        assert_eq!(hello_as(&a, &mountd)["running"], true, "after {what}");
        assert!(alive(pid), "velo-mountd died on {what}");
    }
    run_as(&a, &mountd, &project);
    assert_same(&before, &stored(&env), "after A's run");
    still_serving(&mountd, pid);

    // The control: the honest stream is taken.
    let r = raw(
        &b,
        &mountd,
        &env,
        &[
            "import",
            "--name",
            "honest",
            "--image",
            &image_arg,
            "--objects",
            &objects_arg,
        ],
    );
    assert_eq!(r["responses"][1]["imported"]["objects_sent"], 3, "{r}");
    assert!(
        env.store
            .join(format!("refs/users/{}/honest", b.uid))
            .exists()
    );
}

// --- 3. quota ---------------------------------------------------------------------------------

/// B's refs may hold at most the quota: a larger snapshot is refused with a message naming
/// the quota and stores nothing, a smaller one fits, a second that would go over is refused
/// until B removes the first. A's quota is A's.
#[test]
fn b_cannot_exceed_the_quota() {
    if !can_mount("b_cannot_exceed_the_quota") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start_with(&env, &["--user-quota", "200K"]);
    let a = TestUser::create("s3a", env.dir.path());
    let b = TestUser::create("s3b", env.dir.path());
    let quota = 200 * 1024;
    let used = |u: &TestUser| hello_as(u, &mountd)["used"].as_u64().expect("used");
    assert_eq!(hello_as(&b, &mountd)["quota"], quota);

    let big = b.home.join("big");
    tree_of(&b, &big, &[("blob", noise(31, 250_000))]);
    let one = b.home.join("one");
    tree_of(&b, &one, &[("blob", noise(32, 100_000))]);
    let two = b.home.join("two");
    tree_of(&b, &two, &[("blob", noise(33, 100_000))]);

    let refused = |dir: &Path, name: &str| {
        let before = stored(&env);
        let out = output(b.velo(
            &mountd,
            &b.home,
            &["snapshot", path_str(dir), "--ref", name],
        ));
        assert!(
            !out.status.success(),
            "B's snapshot of {name} was taken over the quota: {}",
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("quota of {quota} bytes")),
            "the refusal names the quota: {err}"
        );
        assert_same(&before, &stored(&env), &format!("refused {name}"));
    };
    refused(&big, "big");
    assert_eq!(used(&b), 0);

    // An image claiming a file of 2^64 - 256 bytes is over any quota (the sum does not wrap).
    raw_client(&env);
    let claim = huge_claim_payload(&env);
    let before = stored(&env);
    let r = raw(
        &b,
        &mountd,
        &env,
        &[
            "import",
            "--name",
            "claim",
            "--image",
            path_str(&claim.join("image")),
        ],
    );
    assert_eq!(kind(&r["responses"][0]), Some("quota"), "{r}");
    let message = r["responses"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains(&format!("quota of {quota} bytes")),
        "{message}"
    );
    assert_same(&before, &stored(&env), "the claim of 2^64 - 256 bytes");

    let r = snapshot_as(&b, &mountd, &one, "one");
    let held = used(&b);
    assert!(held >= 100_000 && held <= quota, "B holds {held}: {r}");
    refused(&two, "two");
    assert_eq!(used(&b), held);

    // A's quota is A's own.
    let a_tree = a.home.join("tree");
    tree_of(&a, &a_tree, &[("blob", noise(34, 100_000))]);
    snapshot_as(&a, &mountd, &a_tree, "mine");

    ok(
        b.velo(&mountd, &b.home, &["ref", "rm", "one"]),
        "B's ref rm",
    );
    // The bytes are still in the store until GC removes them: still charged, or importing and
    // removing over and over would grow the store without bound between collections.
    assert_eq!(used(&b), held, "charged until collected");
    refused(&two, "two"); // still, before GC
    let gc = Command::new(common::velo_bin())
        .arg("--store")
        .arg(&env.store)
        .arg("gc")
        .output()
        .expect("run velo gc");
    assert!(gc.status.success(), "gc: {}", common::describe(&gc));
    assert_eq!(used(&b), 0, "collected: the bytes are given back");
    snapshot_as(&b, &mountd, &two, "two");
    assert!(used(&b) >= 100_000);
}

// --- 4. paths ---------------------------------------------------------------------------------

/// Nothing B sends is a path to the service: path-like names, persist ids with `..`, unknown
/// fields (`target`, `path`) and unknown verbs are refused as bad requests before anything is
/// opened, the store stays byte for byte the same, and no path B names comes to exist.
/// Root-only verbs are denied.
#[test]
fn b_cannot_make_the_service_open_create_or_mount_a_path() {
    if !can_mount("b_cannot_make_the_service_open_create_or_mount_a_path") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let pid = service_pid(&mountd);
    raw_client(&env);
    let a = TestUser::create("s4a", env.dir.path());
    let b = TestUser::create("s4b", env.dir.path());
    let a_tree = a.home.join("tree");
    tree_of(&a, &a_tree, &[("f", noise(41, 1000))]);
    snapshot_as(&a, &mountd, &a_tree, "secret");
    let b_tree = b.home.join("tree");
    tree_of(&b, &b_tree, &[("f", noise(42, 1000))]);
    snapshot_as(&b, &mountd, &b_tree, "mine");

    let bait = env.path("pwned");
    let bait_in_b = b.home.join("pwned");
    let (bait, bait_b) = (path_str(&bait), path_str(&bait_in_b));
    let zero = "0".repeat(64);
    let a_ref = format!("../{}/secret", a.uid);
    let bad: Vec<Value> = vec![
        json!({"resolve": {"name": "../../etc"}}),
        json!({"resolve": {"name": "/etc/passwd"}}),
        json!({"resolve": {"name": "mine\u{0}/../../x"}}),
        json!({"resolve": {"name": "mine", "persist": "../../../../etc/passwd"}}),
        json!({"resolve": {"name": "mine", "path": "/etc/shadow"}}),
        json!({"mount": {"name": "../../../etc", "writes": "read-only"}}),
        json!({"mount": {"name": a_ref, "writes": "read-only"}}),
        json!({"mount": {"name": "..", "writes": "discard"}}),
        json!({"mount": {"name": ".", "writes": "discard"}}),
        json!({"mount": {"name": "mine", "writes": "discard", "target": bait}}),
        json!({"mount": {"name": "mine", "writes": {"persist": "../../../pwned"}}}),
        json!({"mount": {"name": "mine", "writes": {"persist": bait}}}),
        json!({"mount": {"name": "mine", "writes": {"upper": bait_b}}}),
        json!({"import": {"name": "../../pwned", "image": zero, "size": 10}}),
        json!({"import": {"name": "ok", "image": zero, "size": 10, "path": bait}}),
        json!({"remove-ref": {"name": "../../meta.json"}}),
        json!({"remove-ref": {"name": a_ref}}),
        json!({"open": {"path": "/etc/shadow"}}),
        json!({"unmount": {"path": "/"}}),
        json!({"mkdir": {"path": bait}}),
        json!({"attach": {"name": "mine", "target": bait_b}}),
        json!({"publish": {"name": "mine"}}),
        json!({"gc": null}),
    ];
    let denied = [json!("status"), json!("stop")];
    let cases: Vec<Value> = bad
        .iter()
        .chain(&denied)
        .map(|m| json!({"hello": true, "hex": hex::encode(m.to_string())}))
        .collect();
    let file = env.path("path-cases.json");
    fs::write(&file, serde_json::to_vec(&cases).expect("json")).expect("write");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");

    let before = listing(&env.store);
    let r = raw(&b, &mountd, &env, &["replay", path_str(&file)]);
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), cases.len());
    for (msg, res) in bad.iter().chain(&denied).zip(results) {
        let answers = res["responses"].as_array().expect("responses");
        let want = if denied.contains(msg) {
            "denied"
        } else {
            "bad-request"
        };
        assert_eq!(answers.len(), 1, "{msg}: {res}");
        assert_eq!(kind(&answers[0]), Some(want), "{msg}: {res}");
        assert_eq!(res["fds"], 0, "{msg}: {res}");
    }
    assert_same(&before, &listing(&env.store), "path-like requests");
    assert!(!bait_in_b.exists() && !env.path("pwned").exists());
    let made: Vec<PathBuf> = common::walkdir(env.dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("pwned"))
        .collect();
    assert!(made.is_empty(), "paths B named were created: {made:?}");
    assert!(!Path::new("/etc/pwned").exists());
    // A's ref is still there, B's too.
    assert!(
        env.store
            .join(format!("refs/users/{}/secret", a.uid))
            .exists()
    );
    assert!(
        env.store
            .join(format!("refs/users/{}/mine", b.uid))
            .exists()
    );
    still_serving(&mountd, pid);
    assert_eq!(hello_as(&a, &mountd)["uid"], a.uid);
}

// --- 5. the host namespace --------------------------------------------------------------------

/// A mount fd from the service is only attachable in a namespace of B's own: in the host's,
/// move_mount fails with EPERM (so do changing the detached mount's flags and cloning a host
/// path), and the host's mount table shows no velo mount of the test's store while B holds
/// the fd, nor during B's `velo run` (whose own namespace does show it).
#[test]
fn b_cannot_attach_anything_into_the_host_namespace() {
    if !can_mount("b_cannot_attach_anything_into_the_host_namespace") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    raw_client(&env);
    let a = TestUser::create("s5a", env.dir.path());
    let b = TestUser::create("s5b", env.dir.path());
    let b_tree = b.home.join("tree");
    tree_of(&b, &b_tree, &[("f", noise(51, 1000))]);
    snapshot_as(&b, &mountd, &b_tree, "mine");
    assert!(
        host_mounts_of(&env).is_empty(),
        "{:?}",
        host_mounts_of(&env)
    );

    for writes in ["read-only", "discard"] {
        let target = b.home.join(format!("host-{writes}"));
        let held = Held::spawn(raw_command(
            &b,
            &mountd,
            &env,
            &[
                "host-attach",
                "mine",
                "--writes",
                writes,
                "--target",
                path_str(&target),
                "--hold",
            ],
        ));
        let r = held.until(writes, &|v| v.get("fd").is_some(), &mut Vec::new());
        assert_eq!(r["fd"], true, "B got a mount fd: {r}");
        assert_eq!(r["move_mount"], "EPERM", "{writes}: {r}");
        assert_eq!(r["open_tree_clone"], "EPERM", "{writes}: {r}");
        assert_eq!(r["setattr_detached"], "EPERM", "{writes}: {r}");
        assert_eq!(r["mountinfo"], Value::Null, "{writes}: {r}");
        assert_eq!(r["target_entries"], json!([]), "{writes}: {r}");
        let shown = host_mounts_of(&env);
        assert!(shown.is_empty(), "the host shows: {shown:?}");
        held.finish();
        assert!(!common::is_mount_point(&target));
    }

    // During B's run: mounted in its namespace, not in the host's.
    let project = project_of(&b, "proj");
    ok(b.velo(&mountd, &project, &["run", "true"]), "B's first run");
    let ready = project.join("ready");
    let go = project.join("go");
    let script = format!(
        "echo $$ > {r}.tmp && mv {r}.tmp {r}; while [ ! -e {g} ]; do sleep 0.05; done; \
         cat deps/lib/built-by",
        r = path_str(&ready),
        g = path_str(&go)
    );
    let run = Held::spawn(b.velo(&mountd, &project, &["run", "sh", "-c", &script]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "B's command did not start");
        std::thread::yield_now();
    }
    let cmd_pid = fs::read_to_string(&ready).expect("pid");
    let theirs = fs::read_to_string(format!("/proc/{}/mountinfo", cmd_pid.trim()))
        .expect("the command's mountinfo");
    let deps = path_str(&project.join("deps")).to_owned();
    assert!(
        theirs
            .lines()
            .any(|l| l.contains(&format!(" {deps} ")) && l.contains(" velo:")),
        "B's namespace has the mount:\n{theirs}"
    );
    let shown = host_mounts_of(&env);
    assert!(shown.is_empty(), "the host shows B's run: {shown:?}");
    fs::write(&go, "").expect("go");
    let printed = run.finish();
    assert_eq!(
        printed,
        [json!(b.uid)],
        "B's run printed its own tree's builder"
    );
    assert!(host_mounts_of(&env).is_empty());
    assert_eq!(hello_as(&a, &mountd)["uid"], a.uid);
}

// --- 6. crashing or stalling ------------------------------------------------------------------

/// While B holds every connection it may have — one stalled mid-message, one trickling a byte
/// a second, one idle, one 60 KB into a message that never ends — a fifth is refused as busy,
/// and A's warm run is served at once; B's
/// malformed, oversized, deeply nested and half-closed messages are refused or dropped; the
/// same service process answers throughout.
#[test]
fn b_cannot_crash_or_stall_the_service() {
    if !can_mount("b_cannot_crash_or_stall_the_service") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start_with(&env, &["--max-per-user", "4"]);
    let pid = service_pid(&mountd);
    raw_client(&env);
    let a = TestUser::create("s6a", env.dir.path());
    let b = TestUser::create("s6b", env.dir.path());
    let project = project_of(&a, "proj");
    run_as(&a, &mountd, &project); // builds
    run_as(&a, &mountd, &project); // warm

    let flood = Held::spawn(raw_command(&b, &mountd, &env, &["flood"]));
    let mut seen = Vec::new();
    let ready = flood.until("flood", &|v| v["ready"] == true, &mut seen);
    assert_eq!(
        kind(&ready["extra"]),
        Some("busy"),
        "a fifth connection: {ready}"
    );
    let busy = ready["extra"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(busy.contains("limit per user"), "{busy}");
    flood.until(
        "trickle",
        &|v| v["sent"].as_u64().is_some_and(|n| n >= 2),
        &mut seen,
    );
    let took = run_as(&a, &mountd, &project);
    assert!(
        took < Duration::from_secs(15),
        "A's warm run took {took:?} while B stalls the service"
    );
    assert_eq!(hello_as(&a, &mountd)["uid"], a.uid);
    let mut flood = flood;
    assert!(flood.running(), "the hostile client gave up");
    let rest = flood.finish();
    seen.extend(rest);
    let done = seen.iter().find(|v| v["done"] == true).expect("a summary");
    assert_eq!(
        done["answered"],
        json!([]),
        "the service cut off or answered a held connection: {seen:?}"
    );
    assert!(done["sent"].as_u64().unwrap_or(0) >= 2, "{done}");
    assert!(alive(pid));

    // B's connections are counted out once closed: B may connect again.
    let r = raw(
        &b,
        &mountd,
        &env,
        &["ask", "--retry-busy", "30", r#""refs""#],
    );
    assert_eq!(r["hello"]["hello"]["uid"], b.uid, "{r}");

    // Malformed messages, each on its own connection.
    let nested = "[".repeat(20_000);
    let malformed: Vec<(bool, Vec<u8>)> = vec![
        (true, br#"{"resolve":"#.to_vec()),
        (false, b"not json at all".to_vec()),
        (true, br#"{"hello":{"version":1}}{"refs""#.to_vec()),
        (true, vec![0xff, 0xfe, b'{', 0x80]),
        (true, nested.into_bytes()),
        (
            true,
            br#"{"hello":{"version":99999999999999999999999999}}"#.to_vec(),
        ),
        (true, br#"{"resolve":{"name":"a","name":"b"}}"#.to_vec()),
        (true, b"\"refs\" trailing".to_vec()),
    ];
    let cases: Vec<Value> = malformed
        .iter()
        .map(|(hello, bytes)| json!({"hello": hello, "hex": hex::encode(bytes)}))
        .collect();
    let file = env.path("malformed.json");
    fs::write(&file, serde_json::to_vec(&cases).expect("json")).expect("write");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
    let r = raw(&b, &mountd, &env, &["replay", path_str(&file)]);
    for ((_, bytes), res) in malformed
        .iter()
        .zip(r["results"].as_array().expect("results"))
    {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
        assert_eq!(res["timed_out"], Value::Null, "{shown}: {res}");
        let answers = res["responses"].as_array().expect("responses");
        assert_eq!(answers.len(), 1, "{shown}: {res}");
        assert_eq!(kind(&answers[0]), Some("bad-request"), "{shown}: {res}");
    }
    run_as(&a, &mountd, &project);

    // More than 64 KiB without a NUL: refused at the limit, not buffered.
    let r = raw(&b, &mountd, &env, &["raw", "--fill", "70000"]);
    assert_eq!(r["timed_out"], false, "{r}");
    let answers = r["responses"].as_array().expect("responses");
    assert_eq!(answers.len(), 1, "{r}");
    assert_eq!(kind(&answers[0]), Some("bad-request"), "{r}");
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("longer than 65536"),
        "{r}"
    );
    assert_eq!(r["eof"], true, "the service closes the connection: {r}");

    // Half-closed mid-message: the service lets the connection go without an answer.
    let r = raw(
        &b,
        &mountd,
        &env,
        &["raw", r#"{"resolve":{"na"#, "--shut-wr"],
    );
    assert_eq!(
        (&r["eof"], &r["timed_out"]),
        (&json!(true), &json!(false)),
        "{r}"
    );
    assert_eq!(r["responses"], json!([]), "{r}");
    run_as(&a, &mountd, &project);

    // A tree 2000 directories deep (the composefs reader takes up to 2047): parsing it
    // recurses once per level in the connection's thread, whose stack must hold it.
    let deep = env.path("deep");
    let mut leaf = deep.clone();
    for _ in 0..2000 {
        leaf.push("d");
    }
    fs::create_dir_all(&leaf).expect("mkdir a deep tree");
    fs::write(leaf.join("leaf"), "x").expect("write");
    let dir = env.path("payload-deep");
    payload(&env, &deep, &dir);
    let r = raw(
        &b,
        &mountd,
        &env,
        &[
            "import",
            "--name",
            "deep",
            "--image",
            path_str(&dir.join("image")),
        ],
    );
    assert!(r["responses"][1]["imported"].is_object(), "{r}");
    let r = raw(
        &b,
        &mountd,
        &env,
        &[
            "ask",
            r#"{"resolve":{"name":"deep","summary":true}}"#,
            r#"{"mount":{"name":"deep","writes":"read-only"}}"#,
        ],
    );
    assert_eq!(r["responses"][0]["resolved"]["files"], 1, "{r}");
    assert!(r["responses"][1]["mounted"].is_object(), "{r}");
    run_as(&a, &mountd, &project);
    still_serving(&mountd, pid);
}

// --- 7. nosuid, nodev, and set-id bits --------------------------------------------------------

/// An image may claim root-owned set-id files, file capabilities and device nodes; the service
/// maps B's import to B (and says so), the mount is nosuid,nodev, and when B clears those
/// flags from its own namespace (the kernel lets it; the test reports which) the tree is
/// still harmless: the copied `id` runs as B, no device node exists, B cannot make one.
#[test]
fn images_stay_nosuid_nodev_and_b_cannot_undo_that_harmfully() {
    if !can_mount("images_stay_nosuid_nodev_and_b_cannot_undo_that_harmfully") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    raw_client(&env);
    let a = TestUser::create("s7a", env.dir.path());
    let b = TestUser::create("s7b", env.dir.path());

    let tree = env.path("suid-tree");
    fs::create_dir_all(tree.join("bin")).expect("mkdir");
    fs::create_dir_all(tree.join("dev")).expect("mkdir");
    for (name, mode) in [("id", 0o4755), ("id-sg", 0o2755), ("id-cap", 0o755)] {
        let p = tree.join("bin").join(name);
        fs::copy("/usr/bin/id", &p).expect("copy id");
        std::os::unix::fs::chown(&p, Some(0), Some(0)).expect("chown");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let caps = Command::new("setcap")
        .arg("cap_setuid,cap_dac_override+ep")
        .arg(tree.join("bin/id-cap"))
        .output()
        .is_ok_and(|o| o.status.success());
    for (name, ty, major, minor) in [("null", "c", "1", "3"), ("loop0", "b", "7", "0")] {
        let out = output({
            let mut c = Command::new("mknod");
            c.arg(tree.join("dev").join(name)).args([ty, major, minor]);
            c
        });
        assert!(out.status.success(), "mknod: {}", describe(&out));
    }
    let dir = env.path("payload-suid");
    payload(&env, &tree, &dir);

    // B imports it raw.
    let r = raw(
        &b,
        &mountd,
        &env,
        &[
            "import",
            "--name",
            "suid",
            "--image",
            path_str(&dir.join("image")),
            "--objects",
            path_str(&dir.join("objects")),
        ],
    );
    let imported = &r["responses"][1]["imported"];
    assert!(imported.is_object(), "{r}");
    let count = |k: &str| imported[k].as_u64().unwrap_or(0);
    assert!(count("owners_mapped") >= 6, "owners mapped: {imported}");
    assert_eq!(count("setid_cleared"), 2, "{imported}");
    assert_eq!(count("devices_removed"), 2, "{imported}");
    if caps {
        assert!(
            count("xattrs_removed") >= 1,
            "capabilities dropped: {imported}"
        );
    }

    // Mounted in B's namespace: B's files, no set-id, no devices; then B clears the flags.
    let m = raw(
        &b,
        &mountd,
        &env,
        &[
            "mount",
            "suid",
            "--writes",
            "discard",
            "--target",
            path_str(&b.home.join("mnt")),
            "--clear-nosuid",
            "--mknod",
            "dev/new-null",
            "--run",
            r#"["bin/id","-u"]"#,
            "--run",
            r#"["bin/id"]"#,
            "--run",
            r#"["bin/id-sg","-g"]"#,
            "--run",
            r#"["bin/id-cap","-u"]"#,
        ],
    );
    assert_eq!(m["attach"], Value::Null, "B attaches in its namespace: {m}");
    let opts = m["mountinfo"]["options"].as_array().expect("options");
    assert!(
        opts.contains(&json!("nosuid")) && opts.contains(&json!("nodev")),
        "the mount is nosuid,nodev: {m}"
    );
    for e in m["listing"].as_array().expect("listing") {
        let path = e["path"].as_str().unwrap_or_default();
        assert_eq!(
            (&e["uid"], &e["gid"]),
            (&json!(b.uid), &json!(b.gid)),
            "{e}"
        );
        assert_eq!(
            e["mode"].as_u64().unwrap_or(0) & 0o7000,
            0,
            "set-id bits: {e}"
        );
        assert!(
            !matches!(e["type"].as_str(), Some("char" | "block")),
            "a device node: {e}"
        );
        assert!(
            !e["xattrs"].to_string().contains("security.capability"),
            "{path}: {e}"
        );
    }
    let names: BTreeSet<&str> = m["listing"]
        .as_array()
        .expect("listing")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(
        names.contains("bin/id") && names.contains("dev"),
        "{names:?}"
    );
    assert!(
        !names.contains("dev/null") && !names.contains("dev/loop0"),
        "{names:?}"
    );

    let cleared = m["setattr"].is_null();
    eprintln!(
        "images_stay_nosuid_nodev_and_b_cannot_undo_that_harmfully: mount_setattr clearing \
         nosuid,nodev from B's own namespace {} (options after: {})",
        if cleared {
            "SUCCEEDED".to_owned()
        } else {
            format!("failed with {}", m["setattr"])
        },
        m["mountinfo_after_setattr"]["options"]
    );
    if cleared {
        let after = m["mountinfo_after_setattr"]["options"]
            .as_array()
            .expect("options");
        assert!(!after.contains(&json!("nosuid")), "{m}");
    }
    assert_ne!(
        m["mknod"]["dev/new-null"],
        Value::Null,
        "B made a device: {m}"
    );
    let runs = m["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{m}");
    for run in runs {
        assert_eq!(run["status"], 0, "{run}");
    }
    let uid = b.uid.to_string();
    assert_eq!(runs[0]["stdout"], format!("{uid}\n"), "set-uid id: {m}");
    let full = runs[1]["stdout"].as_str().unwrap_or_default();
    assert!(
        full.starts_with(&format!("uid={uid}("))
            && !full.contains("euid=")
            && !full.contains("egid="),
        "{full}"
    );
    assert_eq!(runs[2]["stdout"], format!("{}\n", b.gid), "set-gid id: {m}");
    assert_eq!(runs[3]["stdout"], format!("{uid}\n"), "id with caps: {m}");

    // Root cannot publish such a tree for everyone either.
    let root_store = |args: &[&str]| {
        let mut c = Command::new(common::velo_bin());
        c.arg("--store")
            .arg(&env.store)
            .args(args)
            .env_remove("VELO_STORE");
        c
    };
    ok(
        root_store(&["snapshot", path_str(&tree), "--ref", "root/suid"]),
        "root's snapshot",
    );
    let out = output(root_store(&["ref", "publish", "root/suid"]));
    assert!(!out.status.success(), "published: {}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set-id"));
    assert_eq!(hello_as(&a, &mountd)["uid"], a.uid);
}

// --- 8. fuzz ----------------------------------------------------------------------------------

/// A well-formed request whose values are each, half the time, picked from hostile ones:
/// names with `..`, NULs, 300 bytes, other users' prefixes; persist ids, sizes, digests and
/// versions out of range or of the wrong type.
fn hostile_request(rng: &mut Rng) -> Value {
    let long = "n".repeat(300);
    let mut pick = |good: &[Value], bad: &[Value]| {
        let pool = if rng.below(2) == 0 { good } else { bad };
        pool[rng.below(pool.len())].clone()
    };
    let name = pick(
        &[json!("mine"), json!("nothing"), json!("deps/custom/x")],
        &[
            "../mine",
            "mine/..",
            "/etc",
            "",
            ".",
            "a//b",
            "users/0/x",
            "public/x",
            &long,
            "mine\u{0}",
            "ü/ß",
            " mine",
            "-",
        ]
        .map(Value::from),
    );
    let persist = pick(
        &[json!("fz"), json!("p-1")],
        &[
            json!("../x"),
            json!(""),
            json!("A"),
            json!("x".repeat(65)),
            json!(7),
        ],
    );
    let writes = pick(
        &[
            json!("read-only"),
            json!("discard"),
            json!({"persist": persist}),
        ],
        &[
            json!("persist"),
            json!(null),
            json!(1),
            json!({"discard": null}),
        ],
    );
    let size = pick(
        &[json!(0), json!(4096)],
        &[
            json!(u64::MAX),
            json!(-1),
            json!(1.5),
            json!("1"),
            json!(268_435_457u64),
        ],
    );
    let image = pick(
        &[json!("ab".repeat(32))],
        &[json!("00"), json!(""), json!("zz".repeat(32)), json!(null)],
    );
    let version = pick(
        &[json!(1)],
        &[json!(0), json!(-1), json!("1"), json!(4_294_967_296u64)],
    );
    let bare = pick(
        &[json!("done"), json!("refs")],
        &[json!("status"), json!("stop")],
    );
    let summary = pick(&[json!(true), json!(false)], &[json!("yes")]);
    match rng.below(6) {
        0 => json!({"resolve": {"name": name, "summary": summary, "persist": persist}}),
        1 => json!({"import": {"name": name, "image": image, "size": size}}),
        2 => json!({"mount": {"name": name, "writes": writes}}),
        // (B keeps "mine" for the mounts; "spare" may go.)
        3 if name == "mine" => json!({"remove-ref": {"name": "spare"}}),
        3 => json!({"remove-ref": {"name": name}}),
        4 => json!({"hello": {"version": version}}),
        _ => bare,
    }
}

/// Hundreds of mutated requests (bit flips, inserted, deleted, duplicated and dictionary
/// bytes; a fixed seed; `VELO_FUZZ_CASES` for more) from B on fresh connections: every one is
/// answered with a well-formed response or closed, none hangs, and afterwards the same
/// service answers hello and serves A's run.
#[test]
fn fuzzed_requests_from_b_leave_the_service_serving() {
    if !can_mount("fuzzed_requests_from_b_leave_the_service_serving") {
        return;
    }
    let env = Env::new();
    let mountd = Mountd::start(&env);
    let pid = service_pid(&mountd);
    raw_client(&env);
    let a = TestUser::create("s8a", env.dir.path());
    let b = TestUser::create("s8b", env.dir.path());
    let project = project_of(&a, "proj");
    run_as(&a, &mountd, &project);
    let b_tree = b.home.join("tree");
    tree_of(&b, &b_tree, &[("f", noise(81, 1000))]);
    snapshot_as(&b, &mountd, &b_tree, "mine");
    snapshot_as(&b, &mountd, &b_tree, "spare");

    let n: usize = std::env::var("VELO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let image = "ab".repeat(32);
    let base: Vec<String> = [
        json!({"hello": {"version": 1}}),
        json!({"resolve": {"name": "mine"}}),
        json!({"resolve": {"name": "mine", "summary": true, "persist": "p-1"}}),
        json!({"import": {"name": "fz", "image": image, "size": 4096}}),
        json!({"import": {"name": null, "image": image, "size": 0}}),
        json!({"mount": {"name": "mine", "writes": "read-only"}}),
        json!({"mount": {"name": "mine", "writes": "discard"}}),
        json!({"mount": {"name": "mine", "writes": {"persist": "fz"}}}),
        json!({"remove-ref": {"name": "nothing"}}),
        json!("done"),
        json!("refs"),
        json!("status"),
        json!("stop"),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    let dictionary: [&[u8]; 14] = [
        b"..",
        b"/",
        b"../../etc",
        b"\\u0000",
        b"99999999999999999999",
        b"-1",
        b"null",
        b"true",
        br#","target":"/tmp/x""#,
        br#"{"persist":"x"}"#,
        b"\"",
        b"{",
        b"}",
        b"\x00",
    ];
    const PUNCT: &[u8] = b"\"{}[]:,\\./0a";
    let mut rng = Rng(0x5eed_f022);
    // A third are well-formed requests with hostile values; the rest are valid messages
    // mutated. Either may get a byte or a few mutated, and a third go without hello.
    let cases: Vec<Value> = (0..n)
        .map(|_| {
            let (mut m, mutations) = if rng.below(3) == 0 {
                (
                    hostile_request(&mut rng).to_string().into_bytes(),
                    rng.below(2),
                )
            } else {
                (
                    base[rng.below(base.len())].clone().into_bytes(),
                    1 + rng.below(3),
                )
            };
            for _ in 0..mutations {
                let at = rng.below(m.len() + 1);
                match rng.below(7) {
                    0 if !m.is_empty() => {
                        let i = at.min(m.len() - 1);
                        m[i] ^= 1 << rng.below(8);
                    }
                    1 => m.insert(at, rng.next() as u8),
                    2 if at < m.len() => {
                        m.remove(at);
                    }
                    3 if at < m.len() => m[at] = PUNCT[rng.below(PUNCT.len())],
                    4 if at < m.len() => {
                        let end = (at + 1 + rng.below(16)).min(m.len());
                        let piece = m[at..end].to_vec();
                        let to = rng.below(m.len() + 1);
                        m.splice(to..to, piece);
                    }
                    5 => m.truncate(at),
                    _ => {
                        let word = dictionary[rng.below(dictionary.len())];
                        m.splice(at..at, word.iter().copied());
                    }
                }
            }
            json!({"hello": rng.below(3) > 0, "hex": hex::encode(&m)})
        })
        .collect();
    let file = env.path("fuzz.json");
    fs::write(&file, serde_json::to_vec(&cases).expect("json")).expect("write");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");

    let r = raw(&b, &mountd, &env, &["replay", path_str(&file)]);
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), n);
    let known = [
        "hello", "resolved", "need", "imported", "mounted", "refs", "status", "ok", "error",
    ];
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (case, res) in cases.iter().zip(results) {
        assert_eq!(res["timed_out"], Value::Null, "case {case} hung: {res}");
        assert_eq!(res["recv_error"], Value::Null, "case {case}: {res}");
        for answer in res["responses"].as_array().expect("responses") {
            let key = answer
                .as_object()
                .filter(|o| o.len() == 1)
                .and_then(|o| o.keys().next().cloned())
                .or_else(|| answer.as_str().map(str::to_owned))
                .unwrap_or_default();
            assert!(
                known.contains(&key.as_str()),
                "case {case}: a malformed answer {answer}"
            );
            let label = kind(answer).map_or(key, |k| format!("error:{k}"));
            *kinds.entry(label).or_default() += 1;
        }
    }
    eprintln!("fuzzed_requests_from_b_leave_the_service_serving: {n} cases, answers {kinds:?}");
    assert!(
        kinds.get("error:bad-request").copied().unwrap_or(0) > 0,
        "{kinds:?}"
    );
    assert!(
        kinds
            .keys()
            .any(|k| !k.starts_with("error") && k != "hello"),
        "no mutated request was taken: {kinds:?}"
    );
    assert!(
        !kinds.contains_key("error:failed"),
        "the service failed internally: {kinds:?}"
    );
    still_serving(&mountd, pid);
    let r = raw(&b, &mountd, &env, &["ask", r#""refs""#]);
    assert_eq!(r["hello"]["hello"]["uid"], b.uid, "{r}");
    run_as(&a, &mountd, &project);
}
