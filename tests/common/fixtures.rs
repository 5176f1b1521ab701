//! Registry-free dependency fixtures: npm tarballs packed here, and a Python wheel zipped here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    fs::write(path, text).expect("write fixture file");
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        super::describe(&out)
    );
}

/// Packs `vr-math@1.0.0` and `vr-cli@1.0.0` (a `bin`, depending on `vr-math@^1`) into tarballs
/// under `dir`, and writes a project at `project` depending on both by `file:` path, with a
/// package-lock.json made offline (no node_modules). `cache` is npm's cache dir.
pub fn npm_project(dir: &Path, project: &Path, cache: &Path) {
    let tarballs = dir.join("tarballs");
    fs::create_dir_all(&tarballs).expect("mkdir");
    let packages = [
        (
            "math",
            r#"{"name":"vr-math","version":"1.0.0","main":"index.js"}"#.to_owned(),
            ("index.js", "exports.add = (a, b) => a + b;\n"),
        ),
        (
            "cli",
            format!(
                r#"{{"name":"vr-cli","version":"1.0.0","bin":{{"vr-cli":"cli.js"}},"dependencies":{{"vr-math":"file:{}"}}}}"#,
                tarballs.join("vr-math-1.0.0.tgz").display()
            ),
            (
                "cli.js",
                "#!/usr/bin/env node\nconst m = require('vr-math');\nconsole.log('vr-cli says', m.add(40, 2));\n",
            ),
        ),
    ];
    for (name, manifest, (file, text)) in &packages {
        let d = dir.join("pkg-src").join(name);
        write(&d.join("package.json"), manifest);
        write(&d.join(file), text);
        run(npm(&d, cache)
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&tarballs));
    }
    write(
        &project.join("package.json"),
        &format!(
            r#"{{"name":"velo-run-test","version":"1.0.0","private":true,"dependencies":{{"vr-math":"file:{}","vr-cli":"file:{}"}}}}"#,
            tarballs.join("vr-math-1.0.0.tgz").display(),
            tarballs.join("vr-cli-1.0.0.tgz").display()
        ),
    );
    run(npm(project, cache).args([
        "install",
        "--package-lock-only",
        "--offline",
        "--no-audit",
        "--no-fund",
    ]));
    assert!(project.join("package-lock.json").is_file());
    assert!(!project.join("node_modules").exists());
}

/// `npm` in `dir` with its cache at `cache`, offline.
pub fn npm(dir: &Path, cache: &Path) -> Command {
    let mut c = Command::new("npm");
    c.current_dir(dir)
        .env("npm_config_cache", cache)
        .env("npm_config_offline", "true");
    c
}

/// Zips a directory laid out as a wheel, adding its RECORD: no setuptools/wheel needed offline.
pub const MAKE_WHEEL: &str = r#"
import base64, hashlib, os, sys, zipfile
src, out, dist_info = sys.argv[1], sys.argv[2], sys.argv[3]
record = []
with zipfile.ZipFile(out, "w") as z:
    for root, dirs, files in sorted(os.walk(src)):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            name = os.path.relpath(path, src)
            data = open(path, "rb").read()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
"#;

/// Builds `vrgreet-1.2.3-py3-none-any.whl` (a package printing a checksum, with a console script
/// `vrgreet`) in `dir` and returns its path.
pub fn wheel(dir: &Path) -> PathBuf {
    let src = dir.join("wheel-src");
    write(
        &src.join("vrgreet/__init__.py"),
        "def something():\n    return 'vrgreet 1.2.3 says ' + str(sum(map(ord, 'velo rift')))\n\n\
         def main():\n    print('console script:', something())\n",
    );
    let di = src.join("vrgreet-1.2.3.dist-info");
    write(
        &di.join("METADATA"),
        "Metadata-Version: 2.1\nName: vrgreet\nVersion: 1.2.3\n",
    );
    write(
        &di.join("WHEEL"),
        "Wheel-Version: 1.0\nGenerator: velo-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    );
    write(
        &di.join("entry_points.txt"),
        "[console_scripts]\nvrgreet = vrgreet:main\n",
    );
    let wheel = dir.join("vrgreet-1.2.3-py3-none-any.whl");
    run(Command::new("python3")
        .args(["-c", MAKE_WHEEL])
        .arg(&src)
        .arg(&wheel)
        .arg("vrgreet-1.2.3.dist-info"));
    wheel
}
