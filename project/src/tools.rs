//! Which binary a version command really runs. A version manager's shim (pyenv, asdf, mise,
//! volta, rustup) is one file for every version it manages, so its identity says nothing about
//! the interpreter behind it: velo asks the manager which binary the shim runs now (`pyenv
//! which python3`, …) and caches version output by that binary's identity. The manager's
//! answer is cached by the shim's identity and the [selection state](selection_files) — the
//! variables and version files the managers read — so a warm run spawns nothing.

use std::path::{Path, PathBuf};

use crate::inputs::Env;

/// A version manager whose shims stand for other binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manager {
    /// pyenv, with the command that answers `which` (its `libexec/pyenv`).
    Pyenv(PathBuf),
    /// asdf (`asdf which`).
    Asdf,
    /// mise (`mise which`).
    Mise,
    /// volta (`volta which`).
    Volta,
    /// rustup's proxies (`rustup which`).
    Rustup,
}

impl Manager {
    /// The command that prints the path of the binary the shim `program` runs now.
    pub fn which_command(&self, program: &str) -> Vec<String> {
        let tool = match self {
            Manager::Pyenv(bin) => bin.display().to_string(),
            Manager::Asdf => "asdf".into(),
            Manager::Mise => "mise".into(),
            Manager::Volta => "volta".into(),
            Manager::Rustup => "rustup".into(),
        };
        vec![tool, "which".into(), program.into()]
    }
}

/// Whether the program `name`, found at `found` (`canonical` with symlinks followed, `head`
/// the start of the file), is a version manager's shim, and whose. Pure.
pub fn shim_of(name: &str, canonical: &Path, head: &[u8]) -> Option<Manager> {
    let target = canonical.file_name()?.to_str()?;
    match target {
        "mise" if name != "mise" => return Some(Manager::Mise),
        "volta-shim" => return Some(Manager::Volta),
        "rustup" | "rustup-init" if name != "rustup" && name != "rustup-init" => {
            return Some(Manager::Rustup);
        }
        _ => {}
    }
    if !head.starts_with(b"#!") {
        return None;
    }
    let text = String::from_utf8_lossy(head);
    // pyenv's shims: `exec "/root/.pyenv/libexec/pyenv" exec "$program" "$@"`.
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("exec ")
            && let Some(cmd) = rest.split_whitespace().next()
        {
            let cmd = cmd.trim_matches('"');
            if cmd.ends_with("/libexec/pyenv") {
                return Some(Manager::Pyenv(PathBuf::from(cmd)));
            }
            if (cmd == "asdf" || cmd.ends_with("/asdf")) && rest.contains(" exec ") {
                return Some(Manager::Asdf);
            }
        }
    }
    None
}

/// The files whose contents pick the version a manager runs, for a project at `project`, the
/// user's `home` and the environment `env`: version files in the project and each parent, and
/// each manager's global setting. Pure.
pub fn selection_files(project: &Path, home: &Path, env: &Env) -> Vec<PathBuf> {
    let var = |name: &str| {
        env.get(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let mut out = Vec::new();
    for dir in project.ancestors() {
        for name in [
            ".python-version",
            ".tool-versions",
            ".node-version",
            ".nvmrc",
            "mise.toml",
            ".mise.toml",
            "mise.local.toml",
            ".mise.local.toml",
            ".config/mise.toml",
            "rust-toolchain",
            "rust-toolchain.toml",
        ] {
            out.push(dir.join(name));
        }
    }
    out.push(project.join("package.json")); // volta's pins
    let pyenv = var("PYENV_ROOT").unwrap_or_else(|| home.join(".pyenv"));
    out.push(pyenv.join("version"));
    out.push(home.join(".tool-versions"));
    let config = var("XDG_CONFIG_HOME").unwrap_or_else(|| home.join(".config"));
    out.push(
        var("MISE_CONFIG_DIR")
            .unwrap_or_else(|| config.join("mise"))
            .join("config.toml"),
    );
    let volta = var("VOLTA_HOME").unwrap_or_else(|| home.join(".volta"));
    out.push(volta.join("tools/user/platform.json"));
    let rustup = var("RUSTUP_HOME").unwrap_or_else(|| home.join(".rustup"));
    out.push(rustup.join("settings.toml"));
    out
}

/// True for the variables that pick the version a manager runs (they enter the selection
/// state with `PATH`).
pub fn selection_var(name: &str) -> bool {
    matches!(
        name,
        "PATH" | "PYENV_VERSION" | "PYENV_ROOT" | "RUSTUP_TOOLCHAIN" | "MISE_ENV" | "VOLTA_HOME"
    ) || (name.starts_with("ASDF_") && name.ends_with("_VERSION"))
        || (name.starts_with("MISE_") && name.ends_with("_VERSION"))
}

/// blake3 of the selection state: the selection variables of `env` and the contents of
/// `files` (`read`: `None` for an absent file). Pure.
pub fn selection_state(
    env: &Env,
    files: &[PathBuf],
    read: &mut dyn FnMut(&Path) -> Option<Vec<u8>>,
) -> blake3::Hash {
    use std::os::unix::ffi::OsStrExt;
    let mut h = blake3::Hasher::new();
    for (k, v) in env.iter().filter(|(k, _)| selection_var(k)) {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    for f in files {
        h.update(f.as_os_str().as_bytes());
        h.update(&[0]);
        match read(f) {
            Some(data) => {
                h.update(&[1]);
                h.update(&(data.len() as u64).to_le_bytes());
                h.update(&data);
            }
            None => {
                h.update(&[0]);
            }
        }
    }
    h.finalize()
}

/// Reads at most a small file (version files are a few bytes; a huge one is not one).
pub fn read_small(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut data = Vec::new();
    file.take(1 << 20).read_to_end(&mut data).ok()?;
    Some(data)
}

/// The first bytes of a file (enough to tell a shim script).
pub fn head(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut data = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(4096).read_to_end(&mut data);
    }
    data
}

/// Resolves a program name through the `PATH` of `env` (names with a `/` are taken as they
/// are).
pub fn which(program: &str, env: &Env) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let paths = env.get("PATH")?;
    std::env::split_paths(paths)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shims_are_told_from_real_binaries() {
        let pyenv = b"#!/usr/bin/env bash\nset -e\nprogram=\"${0##*/}\"\n\
                      exec \"/root/.pyenv/libexec/pyenv\" exec \"$program\" \"$@\"\n";
        assert_eq!(
            shim_of("python3", Path::new("/root/.pyenv/shims/python3"), pyenv),
            Some(Manager::Pyenv("/root/.pyenv/libexec/pyenv".into()))
        );
        let asdf =
            b"#!/usr/bin/env bash\n# asdf-plugin: nodejs 20.1.0\nexec asdf exec \"node\" \"$@\"\n";
        assert_eq!(
            shim_of("node", Path::new("/h/.asdf/shims/node"), asdf),
            Some(Manager::Asdf)
        );
        assert_eq!(
            shim_of("cargo", Path::new("/h/.cargo/bin/rustup"), b"\x7fELF"),
            Some(Manager::Rustup)
        );
        assert_eq!(
            shim_of("rustup", Path::new("/h/.cargo/bin/rustup"), b"\x7fELF"),
            None
        );
        assert_eq!(
            shim_of("node", Path::new("/h/.volta/bin/volta-shim"), b"\x7fELF"),
            Some(Manager::Volta)
        );
        assert_eq!(
            shim_of("python3", Path::new("/h/.local/bin/mise"), b"\x7fELF"),
            Some(Manager::Mise)
        );
        // A real interpreter, and a script that is a program of its own (npm).
        assert_eq!(
            shim_of("python3", Path::new("/usr/bin/python3.11"), b"\x7fELF"),
            None
        );
        let npm = b"#!/usr/bin/env node\nrequire('../lib/cli.js')(process)\n";
        assert_eq!(
            shim_of(
                "npm",
                Path::new("/usr/lib/node_modules/npm/bin/npm-cli.js"),
                npm
            ),
            None
        );
    }

    #[test]
    fn the_selection_state_follows_version_files_and_variables() {
        let env: Env = [("PATH", "/bin"), ("HOME", "/h"), ("LANG", "C")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let files = selection_files(Path::new("/h/p"), Path::new("/h"), &env);
        assert!(files.contains(&PathBuf::from("/h/p/.python-version")));
        assert!(files.contains(&PathBuf::from("/h/.python-version")));
        assert!(files.contains(&PathBuf::from("/h/.pyenv/version")));
        assert!(files.contains(&PathBuf::from("/h/.rustup/settings.toml")));
        let state = |env: &Env, version: Option<&[u8]>| {
            selection_state(env, &files, &mut |p: &Path| {
                (p == Path::new("/h/p/.python-version"))
                    .then(|| version.map(<[u8]>::to_vec))
                    .flatten()
            })
        };
        let base = state(&env, None);
        assert_ne!(state(&env, Some(b"3.12\n")), base);
        assert_ne!(state(&env, Some(b"3.12\n")), state(&env, Some(b"3.11\n")));
        let mut other = env.clone();
        other.insert("PYENV_VERSION".into(), "3.12.1".into());
        assert_ne!(state(&other, None), base);
        let mut unrelated = env.clone();
        unrelated.insert("LANG".into(), "de_DE".into());
        assert_eq!(state(&unrelated, None), base);
    }
}
