//! Paths in velo's JSON records, whatever their bytes: a path that is UTF-8 is a string (as
//! before), any other is `{"bytes": [...]}`, so a mount at a non-UTF-8 target can be recorded
//! (JSON strings hold only Unicode; Linux paths hold any byte but NUL).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Repr {
    Text(String),
    Bytes { bytes: Vec<u8> },
}

fn repr(path: &Path) -> Repr {
    match path.to_str() {
        Some(s) => Repr::Text(s.to_owned()),
        None => Repr::Bytes {
            bytes: path.as_os_str().as_bytes().to_vec(),
        },
    }
}

fn path(repr: Repr) -> PathBuf {
    match repr {
        Repr::Text(s) => PathBuf::from(s),
        Repr::Bytes { bytes } => PathBuf::from(OsString::from_vec(bytes)),
    }
}

/// `#[serde(with = "crate::serde_path")]` for a `PathBuf`.
pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    repr(p).serialize(s)
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    Repr::deserialize(d).map(path)
}

/// `#[serde(with = "crate::serde_path::option")]` for an `Option<PathBuf>`.
pub mod option {
    use super::*;

    /// See [`super::serialize`].
    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        p.as_deref().map(repr).serialize(s)
    }

    /// See [`super::deserialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        Option::<Repr>::deserialize(d).map(|r| r.map(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        #[serde(with = "crate::serde_path")]
        p: PathBuf,
        #[serde(with = "crate::serde_path::option", default)]
        q: Option<PathBuf>,
    }

    fn round_trip(bytes: &[u8]) {
        let p = PathBuf::from(OsString::from_vec(bytes.to_vec()));
        let rec = Rec {
            p: p.clone(),
            q: Some(p),
        };
        let json = serde_json::to_string(&rec).expect("serialize");
        let back: Rec = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, rec, "{json}");
    }

    #[test]
    fn utf8_paths_stay_strings_and_others_round_trip_as_bytes() {
        let rec = Rec {
            p: "/srv/app mnt".into(),
            q: None,
        };
        assert_eq!(
            serde_json::to_string(&rec).expect("json"),
            r#"{"p":"/srv/app mnt","q":null}"#
        );
        let old: Rec = serde_json::from_str(r#"{"p":"/a"}"#).expect("an old record");
        assert_eq!(old.q, None);
        round_trip(b"/tmp/m\xff x");
        round_trip(b"/tmp/\x01\n\t,\\");
        round_trip(b"/");
    }

    #[test]
    fn any_bytes_round_trip() {
        // A deterministic sweep over byte patterns (every byte value, at each position).
        for b in 1..=255u8 {
            round_trip(&[b'/', b, b'x', b]);
        }
    }
}
