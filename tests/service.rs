//! velo-mountd and GC: an image is kept while any velo overlay of it is mounted anywhere,
//! pinned or not — a run whose velo was killed, a service stopped meanwhile.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mountd::Mountd;
use common::{Env, can_mount, describe, path_str};

/// velo is killed while its command runs on a lent overlay: the service retires the overlay
/// (never lends it again while the command holds it), and GC keeps the image — also after the
/// service has stopped and its pins are gone, because the overlay is still mounted in the
/// command's namespace. Once the command has exited, GC collects it.
#[test]
fn a_command_outliving_velo_and_the_service_keeps_its_image() {
    if !can_mount("a_command_outliving_velo_and_the_service_keeps_its_image") {
        return;
    }
    let env = Env::new();
    let project = common::fixtures::custom_project(env.dir.path(), &env.path("custom"));
    let mountd = Mountd::start(&env);
    let velo = |args: &[&str]| {
        let mut c = Command::new(common::velo_bin());
        c.arg("--store")
            .arg(&env.store)
            .arg("--socket")
            .arg(&mountd.socket)
            .args(args)
            .current_dir(&project)
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID");
        c
    };
    let out = velo(&["--json", "status"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let out = velo(&["run", "true"]).output().unwrap();
    assert!(out.status.success(), "build: {}", describe(&out));
    let status: serde_json::Value =
        serde_json::from_slice(&velo(&["--json", "status"]).output().unwrap().stdout).unwrap();
    let image = status[0]["image"].as_str().unwrap().to_owned();
    let ref_name = status[0]["ref"].as_str().unwrap().to_owned();

    // The command waits on a fifo, then reads the mounted tree.
    let fifo = env.path("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let pid_file = env.path("pid");
    let out_file = env.path("out");
    let script = format!(
        "echo $$ > {pid}.tmp && mv {pid}.tmp {pid} && read line < {fifo} && cat deps/lib/deps.lock > {out}",
        pid = path_str(&pid_file),
        fifo = path_str(&fifo),
        out = path_str(&out_file)
    );
    let mut run = velo(&["run", "sh", "-c", &script])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let command_pid = loop {
        if let Ok(p) = fs::read_to_string(&pid_file) {
            break p.trim().parse::<i32>().unwrap();
        }
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever happens below, the command does not outlive the test.
    let _kill = common::KillOnDrop(command_pid);
    run.kill().unwrap();
    run.wait().unwrap();
    // The connection closed without `done`: the overlay is checked, found in use, retired.
    let c = mountd.wait_for("the killed run's overlay was not retired", &|i| {
        i["lent"] == 0 && i["checking"] == 0 && i["retired"] == 1
    });
    assert_eq!(c["idle"], 0, "an overlay in use is never idle: {c}");

    let gc = || {
        let out = Command::new(common::velo_bin())
            .arg("--store")
            .arg(&env.store)
            .args(["--json", "gc", "--keep-last", "0", "--older-than", "0s"])
            .output()
            .unwrap();
        assert!(out.status.success(), "gc: {}", describe(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // First collect what the build left unreferenced (its empty base image).
    gc();
    let out = velo(&["ref", "rm", &ref_name]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    // With the service stopped, nothing pins the image: only the mount in the command's
    // namespace says it is in use.
    mountd.stop();
    let r = gc();
    assert_eq!(
        r["images_removed"], 0,
        "the command still uses the image: {r}"
    );
    assert!(env.store.join("images").join(&image).exists());

    fs::write(&fifo, "go\n").unwrap();
    let gone = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')').next().is_some_and(|r| r.starts_with(" Z"))
        })
    };
    while !gone(command_pid) {
        assert!(Instant::now() < deadline, "the command did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        fs::read_to_string(&out_file).unwrap(),
        "v1\n",
        "the command read its tree after velo and the service were gone"
    );
    let r = gc();
    assert_eq!(
        r["images_removed"], 1,
        "nothing uses the image any more: {r}"
    );
}
