//! The systemd units in deploy/systemd/: their syntax (`systemd-analyze verify`), and
//! velo-mountd started the way they start it — socket activation — serving a user.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mountd::{TestUser, mountd_bin};
use common::{Env, can_mount, describe, velo_bin};

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd"))
}

/// Both units parse without a warning. (`ExecStart` must name an executable for `verify`, so
/// the service is checked with it pointing at the binary under test.)
#[test]
fn the_units_pass_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        if std::env::var("VELO_REQUIRE_MOUNT_TESTS").as_deref() == Ok("1") {
            panic!("systemd-analyze is missing: apt-get install systemd");
        }
        eprintln!("SKIPPED the_units_pass_systemd_analyze_verify: no systemd-analyze");
        return;
    };
    assert!(out.status.success());
    let env = Env::new();
    let dir = env.path("units");
    std::fs::create_dir_all(&dir).unwrap();
    let service = std::fs::read_to_string(units_dir().join("velo-mountd.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/velo-mountd --store /var/lib/velo"));
    let service = service.replace(
        "/usr/local/bin/velo-mountd",
        mountd_bin().to_str().expect("a UTF-8 path"),
    );
    std::fs::write(dir.join("velo-mountd.service"), service).unwrap();
    std::fs::copy(
        units_dir().join("velo-mountd.socket"),
        dir.join("velo-mountd.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("velo-mountd.socket"))
        .arg(dir.join("velo-mountd.service"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}", describe(&out));
    // verify exits 0 on unknown keys and bad values too: any word about our units is a fault.
    let about_ours: Vec<&str> = said.lines().filter(|l| l.contains("velo-mountd")).collect();
    assert!(about_ours.is_empty(), "systemd-analyze verify: {said}");
    let socket = std::fs::read_to_string(dir.join("velo-mountd.socket")).unwrap();
    assert!(
        socket.contains("ListenStream=/run/velo/velo.sock") && socket.contains("SocketMode=0666")
    );
}

/// velo-mountd takes the socket systemd passes (LISTEN_FDS), serves an ordinary user on it,
/// and stops when root asks; `systemd-socket-activate` does what the .socket unit does.
#[test]
fn socket_activation_serves_a_user_and_stops() {
    if !can_mount("socket_activation_serves_a_user_and_stops") {
        return;
    }
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("systemd-socket-activate is missing: apt-get install systemd");
    }
    let env = Env::new();
    let run = env.path("run");
    std::fs::create_dir_all(&run).unwrap();
    for d in [env.dir.path(), run.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let socket = run.join("velo.sock");
    // No --socket: the service must take the one it is passed.
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(mountd_bin())
        .arg("--store")
        .arg(&env.store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        assert!(
            activator.try_wait().unwrap().is_none(),
            "the activator exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // systemd-socket-activate binds it 0644; the .socket unit says SocketMode=0666.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let pid = activator.id();
    let guard = Reap(activator);

    // The first connection starts velo-mountd in the activator's place.
    let user = TestUser::create("act", env.dir.path());
    let tree = env.path("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), vec![7u8; 100_000]).unwrap();
    user.own(&tree);
    let out = user
        .command(&velo_bin(), env.dir.path())
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "snapshot"])
        .arg(&tree)
        .args(["--ref", "mine"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        mountd_bin(),
        "velo-mountd runs in the activator's place"
    );
    assert!(
        env.store
            .join("refs/users")
            .join(user.uid.to_string())
            .join("mine")
            .exists(),
        "the user's ref is in their namespace"
    );

    let stop = Command::new(velo_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["service", "stop"])
        .output()
        .unwrap();
    assert!(stop.status.success(), "{}", describe(&stop));
    let mut guard = guard;
    let status = guard.0.wait().unwrap();
    assert!(status.success(), "velo-mountd exited with {status}");
}
