//! The user's own cargo configuration, kept in force in the Cargo home velo manages: cargo
//! reads `$CARGO_HOME/config.toml`, and velo points `CARGO_HOME` at the project's tree, so the
//! user's mirrors, `[net]` settings and aliases would otherwise be ignored (by the install and
//! by `velo run -- cargo …`). The tree gets a symlink to the user's file (read live; its
//! contents key the tree, so a change that alters the install builds a new one).

use std::path::{Path, PathBuf};

/// The user's cargo config file: `~/.cargo/config.toml`, or the older `~/.cargo/config` (the
/// files the key's inputs name: `inputs::config_files`), unless it is in one of velo's
/// `managed` Cargo homes. `None` if there is none.
pub fn user_config(home: &Path, managed: &[PathBuf]) -> Option<PathBuf> {
    let dir = home.join(".cargo");
    if managed.iter().any(|m| dir.starts_with(m)) {
        return None;
    }
    ["config.toml", "config"]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Links `config` as `cargo_home/config.toml`, unless the tree has a config of its own; the
/// link is owned by `owner`.
pub fn link(cargo_home: &Path, config: &Path, owner: (u32, u32)) -> std::io::Result<()> {
    let at = cargo_home.join("config.toml");
    if std::fs::symlink_metadata(&at).is_ok() || cargo_home.join("config").exists() {
        return Ok(());
    }
    std::os::unix::fs::symlink(config, &at)?;
    rustix::fs::chownat(
        rustix::fs::CWD,
        &at,
        Some(rustix::fs::Uid::from_raw(owner.0)),
        Some(rustix::fs::Gid::from_raw(owner.1)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_cargo_config_is_found_and_velos_own_home_is_not_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".cargo")).expect("mkdir");
        assert_eq!(user_config(&home, &[]), None);
        std::fs::write(home.join(".cargo/config"), "").expect("write");
        assert_eq!(user_config(&home, &[]), Some(home.join(".cargo/config")));
        std::fs::write(home.join(".cargo/config.toml"), "[alias]\n").expect("write");
        assert_eq!(
            user_config(&home, &[]),
            Some(home.join(".cargo/config.toml"))
        );
        assert_eq!(
            user_config(&home, &[home.join(".cargo")]),
            None,
            "velo's own Cargo home is not the user's"
        );
    }

    #[test]
    fn a_tree_with_a_config_of_its_own_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        let user = dir.path().join("user.toml");
        std::fs::write(&user, "").expect("write");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).expect("mkdir");
        link(&tree, &user, me).expect("link");
        assert_eq!(
            std::fs::read_link(tree.join("config.toml")).ok(),
            Some(user.clone())
        );
        let own = dir.path().join("own");
        std::fs::create_dir_all(&own).expect("mkdir");
        std::fs::write(own.join("config.toml"), "x").expect("write");
        link(&own, &user, me).expect("link");
        assert_eq!(
            std::fs::read_to_string(own.join("config.toml"))
                .ok()
                .as_deref(),
            Some("x")
        );
    }
}
