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
const MAKE_WHEEL: &str = r#"
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
    wheel_with(
        dir,
        &[(
            "__init__.py",
            "def something():\n    return 'vrgreet 1.2.3 says ' + str(sum(map(ord, 'velo rift')))\n\n\
             def main():\n    print('console script:', something())\n",
        )],
    )
}

/// Builds `vrgreet-1.2.3-py3-none-any.whl` in `dir` from these module files of package
/// `vrgreet` (which must define `main` for the `vrgreet` console script) and returns its path.
pub fn wheel_with(dir: &Path, modules: &[(&str, &str)]) -> PathBuf {
    let src = dir.join("wheel-src");
    for (name, text) in modules {
        write(&src.join("vrgreet").join(name), text);
    }
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

/// Runs a shell script in `dir` (created if missing), failing the test on error.
pub fn sh(script: &str, dir: &Path) {
    fs::create_dir_all(dir).expect("mkdir");
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
}

/// A tree with every kind of entry a snapshot must keep (needs root for owners, devices and
/// `trusted.*` xattrs): inline, empty and hardlinked files, a sparse file of `sparse_bytes`
/// with data near its end, setuid/setgid/sticky bits, owners, nanosecond mtimes, `user.*`,
/// `trusted.*`, `security.*` and ACL xattrs, the tree's own `trusted.overlay.*` and
/// `user.overlay.*` xattrs, symlinks (relative, absolute, dangling, to a dir), a fifo, device
/// nodes and a name that is not UTF-8. No whiteouts: through a mount they show escaped.
pub fn every_kind_tree(dir: &Path, sparse_bytes: u64) {
    fs::create_dir_all(dir).expect("mkdir");
    let far = sparse_bytes - 3 - (sparse_bytes / 10);
    sh(
        &format!(
            r#"
        mkdir -p d/empty deep/a/b/c ovl
        printf tiny > tiny
        head -c 5000 /dev/urandom > medium
        head -c 300000 /dev/urandom > big
        head -c 3000000 /dev/urandom > bigger
        : > empty
        truncate -s {sparse_bytes} sparse
        printf start | dd of=sparse conv=notrunc status=none
        printf far | dd of=sparse bs=1 seek={far} conv=notrunc status=none
        chmod 4755 medium; chmod 2755 d; chmod 1777 d/empty; chmod 640 big
        chown 1234:5678 tiny
        touch -h -d @1234567890.123456789 tiny
        setfattr -n user.k -v v medium
        setfattr -n trusted.t -v tv medium
        setfattr -n security.s -v sv medium
        setfattr -n trusted.overlay.opaque -v y d
        setfattr -n trusted.overlay.opaque -v x ovl
        setfattr -n user.overlay.opaque -v y ovl
        setfattr -n trusted.overlay.redirect -v /elsewhere big
        setfattr -n user.overlay.whiteout -v '' bigger
        setfacl -m u:1000:rx medium
        setfacl -d -m u:1000:rwx d
        ln -s tiny rel; ln -s /abs/dangling dang; ln -s deep/a dirlink
        ln medium hardlink; ln big deep/a/b/c/biglink
        mkfifo fifo
        mknod cdev c 1 3; mknod bdev b 7 0
        touch "$(printf 'bad\377name')"
        echo x > deep/a/b/c/f
        touch -h -d @1000000000.5 deep/a/b
        "#
        ),
        dir,
    );
}

/// The offset of the bytes "far" in the sparse file of [`every_kind_tree`].
pub fn far_offset(sparse_bytes: u64) -> u64 {
    sparse_bytes - 3 - (sparse_bytes / 10)
}

/// A project at `project` with a hand-written velo.toml whose install records who ran it
/// (`deps/lib/built-by`) and copies its lockfile (`deps/lib/deps.lock`, "v1"); `base` and the
/// project are made traversable for other users.
pub fn custom_project(base: &Path, project: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(project).expect("mkdir");
    fs::write(project.join("deps.lock"), "v1\n").expect("write");
    fs::write(
        project.join("velo.toml"),
        "[[deps]]\necosystem = \"custom\"\ndirs = [\"deps\"]\ninputs = [\"deps.lock\"]\n\
         install = \"mkdir -p deps/lib && id -u > deps/lib/built-by && cp deps.lock deps/lib/\"\n",
    )
    .expect("write");
    for p in [base, project] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    project.to_owned()
}

/// Packs an npm package `name@version` (files given; `extra` is more of its package.json,
/// e.g. `"bin":{…}` — empty for none) into a tarball under `dir/tarballs` and returns its path.
pub fn npm_tarball(
    dir: &Path,
    cache: &Path,
    name: &str,
    version: &str,
    extra: &str,
    files: &[(&str, &str)],
) -> PathBuf {
    let tarballs = dir.join("tarballs");
    fs::create_dir_all(&tarballs).expect("mkdir");
    let src = dir.join("pkg-src").join(format!("{name}-{version}"));
    let comma = if extra.is_empty() { "" } else { "," };
    write(
        &src.join("package.json"),
        &format!(r#"{{"name":"{name}","version":"{version}","main":"index.js"{comma}{extra}}}"#),
    );
    for (file, text) in files {
        write(&src.join(file), text);
    }
    run(npm(&src, cache)
        .args(["pack", "--silent", "--pack-destination"])
        .arg(&tarballs));
    tarballs.join(format!("{name}-{version}.tgz"))
}

/// Builds `NAME-VERSION-py3-none-any.whl` in `dir` (a package `name` of these module files,
/// no console script) and returns its path.
pub fn wheel_named(dir: &Path, name: &str, version: &str, modules: &[(&str, &str)]) -> PathBuf {
    let src = dir.join(format!("wheel-src-{name}-{version}"));
    for (file, text) in modules {
        write(&src.join(name).join(file), text);
    }
    let dist_info = format!("{name}-{version}.dist-info");
    let di = src.join(&dist_info);
    write(
        &di.join("METADATA"),
        &format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"),
    );
    write(
        &di.join("WHEEL"),
        "Wheel-Version: 1.0\nGenerator: velo-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    );
    let wheel = dir.join(format!("{name}-{version}-py3-none-any.whl"));
    run(Command::new("python3")
        .args(["-c", MAKE_WHEEL])
        .arg(&src)
        .arg(&wheel)
        .arg(&dist_info));
    wheel
}

/// A PEP 517 build backend in one module, needing nothing installed (`requires = []`): it
/// builds the project named in pyproject.toml's `[project]` as a wheel whose metadata carries
/// the project's `dependencies`; `build_editable` puts the project dir on `sys.path` (a .pth).
pub const TINY_BACKEND: &str = r#"
import base64, hashlib, os, tomllib, zipfile

def _meta():
    with open("pyproject.toml", "rb") as f:
        p = tomllib.load(f)["project"]
    lines = [f"Metadata-Version: 2.1", f"Name: {p['name']}", f"Version: {p['version']}"]
    lines += [f"Requires-Dist: {d}" for d in p.get("dependencies", [])]
    return p["name"], p["version"], "\n".join(lines) + "\n"

def _wheel(directory, files):
    name, version, metadata = _meta()
    di = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{di}/METADATA"] = metadata
    files[f"{di}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: tiny\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    whl = f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(os.path.join(directory, whl), "w") as z:
        for path, text in sorted(files.items()):
            data = text.encode()
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{di}/RECORD,,")
        z.writestr(f"{di}/RECORD", "\n".join(record) + "\n")
    return whl

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name, _, _ = _meta()
    return _wheel(wheel_directory, {f"{name}/__init__.py": open(f"{name}/__init__.py").read()})

def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name, _, _ = _meta()
    return _wheel(wheel_directory, {f"_{name}_editable.pth": os.getcwd() + "\n"})
"#;
