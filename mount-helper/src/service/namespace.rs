//! Whose refs are whose. Each user has a namespace of refs of their own, stored under
//! `refs/users/<uid>/`; root publishes refs for everyone under `refs/public/`; root's own
//! namespace is the whole store (as for `velo` run by root directly). A user names refs
//! without any prefix: the service adds it, so no name a user sends can reach another
//! namespace.

use std::collections::HashSet;

use velo_objects::{Digest, Store, StoreError};

use crate::protocol::RefEntry;

/// Where users' namespaces live in `refs/`.
pub const USERS: &str = "users";
/// Where published refs live in `refs/`.
pub const PUBLIC: &str = "public";

/// Who is calling, as the kernel says (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id (for messages only: it may be reused).
    pub pid: u32,
}

impl Caller {
    /// Root may do anything it could do on the store directly.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// The stored name of a ref the caller names `name` in their own namespace.
pub fn own_ref(caller: &Caller, name: &str) -> String {
    if caller.is_root() {
        name.to_owned()
    } else {
        format!("{USERS}/{}/{name}", caller.uid)
    }
}

/// The stored name of the published ref `name`.
pub fn published_ref(name: &str) -> String {
    format!("{PUBLIC}/{name}")
}

/// How the caller names the stored ref `stored`, if they may read it: `(name, published)`.
pub fn visible_name(caller: &Caller, stored: &str) -> Option<(String, bool)> {
    if caller.is_root() {
        return Some((stored.to_owned(), stored.starts_with(&format!("{PUBLIC}/"))));
    }
    let own = format!("{USERS}/{}/", caller.uid);
    if let Some(name) = stored.strip_prefix(&own) {
        return Some((name.to_owned(), false));
    }
    stored
        .strip_prefix(&format!("{PUBLIC}/"))
        .map(|name| (name.to_owned(), true))
}

/// The image the caller's `name` stands for — their own ref first, then a published one —
/// and whether it was the published one. `None` if neither exists.
pub fn resolve(
    store: &Store,
    caller: &Caller,
    name: &str,
) -> Result<Option<(Digest, bool)>, StoreError> {
    let candidates = [(own_ref(caller, name), false), (published_ref(name), true)];
    let n = if caller.is_root() { 1 } else { 2 };
    for (stored, published) in candidates.into_iter().take(n) {
        match store.read_ref(&stored) {
            Ok(d) => return Ok(Some((d, published))),
            Err(StoreError::RefNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Every ref the caller may read, as they name them.
pub fn list(store: &Store, caller: &Caller) -> Result<Vec<RefEntry>, StoreError> {
    let mut out = Vec::new();
    for (stored, image) in store.list_refs()? {
        if let (Some((name, published)), Ok(image)) = (visible_name(caller, &stored), image) {
            out.push(RefEntry {
                name,
                image,
                published,
            });
        }
    }
    Ok(out)
}

/// The images the caller's own refs point at now or pointed at before (history), i.e. what
/// the store keeps on their behalf.
pub fn own_images(store: &Store, caller: &Caller) -> Result<HashSet<Digest>, StoreError> {
    let mut images = HashSet::new();
    for (stored, image) in store.list_refs()? {
        if let (Some((_, false)), Ok(image)) = (visible_name(caller, &stored), image) {
            images.insert(image);
            for (_, old) in store.ref_history(&stored).unwrap_or_default() {
                images.insert(old);
            }
        }
    }
    Ok(images)
}

/// The images the caller may read: their own (with history) and the published ones.
pub fn readable_images(store: &Store, caller: &Caller) -> Result<HashSet<Digest>, StoreError> {
    let mut images = own_images(store, caller)?;
    for e in list(store, caller)? {
        images.insert(e.image);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    const B: Caller = Caller {
        uid: 1001,
        gid: 1001,
        pid: 2,
    };
    const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 3,
    };

    #[test]
    fn users_see_their_own_and_published_refs_only() {
        assert_eq!(own_ref(&A, "deps/x"), "users/1000/deps/x");
        assert_eq!(
            visible_name(&A, "users/1000/deps/x"),
            Some(("deps/x".into(), false))
        );
        assert_eq!(visible_name(&B, "users/1000/deps/x"), None);
        assert_eq!(visible_name(&A, "public/base"), Some(("base".into(), true)));
        assert_eq!(
            visible_name(&A, "myapp/deps"),
            None,
            "root's own refs are root's"
        );
        assert_eq!(
            visible_name(&ROOT, "users/1000/deps/x").map(|v| v.1),
            Some(false)
        );
        assert_eq!(own_ref(&ROOT, "a/b"), "a/b");
    }

    proptest! {
        /// Whatever a user names, it is stored in their own namespace, and they see it back
        /// under the same name; no other user sees it.
        #[test]
        fn a_user_name_never_leaves_its_namespace(name in "[a-z0-9._+@-]{1,12}(/[a-z0-9._+@-]{1,12}){0,4}") {
            prop_assume!(velo_objects::validate_ref_name(&name).is_ok());
            let stored = own_ref(&A, &name);
            prop_assert!(stored.starts_with("users/1000/"));
            prop_assert_eq!(visible_name(&A, &stored), Some((name.clone(), false)));
            prop_assert_eq!(visible_name(&B, &stored), None);
        }
    }
}
